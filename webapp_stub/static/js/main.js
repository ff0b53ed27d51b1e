// Entry: sign in, or boot with the token this tab already has. Any uncaught
// failure is shown in words, never as a blank page.

import { App, NOTICE_KEY, OPEN_KEY, TOKEN_KEY } from "./app.js";
import { showSignIn } from "./signin.js";
import { h } from "./view.js";

const root = document.getElementById("root");

function signOut(notice) {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(OPEN_KEY);
  if (notice) sessionStorage.setItem(NOTICE_KEY, notice);
  location.replace("/"); // a fresh page: no state of the old session survives
}

function start() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    const notice = sessionStorage.getItem(NOTICE_KEY) || "";
    sessionStorage.removeItem(NOTICE_KEY);
    showSignIn(root, {
      notice,
      onToken: (value) => {
        sessionStorage.setItem(TOKEN_KEY, value);
        start();
      },
    });
    return;
  }
  const app = new App(root, token, signOut);
  window.rtmApp = app; // for a person's devtools and the tests' inspection
  app.boot();
}

function showFailure(message) {
  const text = `Something went wrong in this page: ${message}`;
  const app = window.rtmApp;
  if (app && app.el) {
    app.showBanner(text, "error");
    return;
  }
  root.replaceChildren(
    h(
      "main",
      { class: "signin" },
      h("h1", {}, "rtm"),
      h("p", { class: "notice error", role: "alert" }, text),
      h("button", { class: "primary", onclick: () => location.reload() }, "Reload"),
    ),
  );
}

window.addEventListener("error", (e) => showFailure(e.message || "an error"));
window.addEventListener("unhandledrejection", (e) => showFailure(String((e.reason && e.reason.message) || e.reason)));
start();
