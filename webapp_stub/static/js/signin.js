// Sign-in: a picker of the demo team's people (only when the webapp runs in demo
// mode, GET /demo/users), or a token. The token goes to sessionStorage, never
// into a URL; it is checked with auth.test before the page boots with it.

import { ApiError, WebApi } from "./api.js";
import { describeError } from "./errors.js";
import { h } from "./view.js";

async function demoPeople() {
  try {
    const response = await fetch("/demo/users", { cache: "no-store", credentials: "omit" });
    if (!response.ok) return null;
    const body = await response.json();
    return body.ok ? body : null;
  } catch {
    return null;
  }
}

/** Show the sign-in screen in ``root``; ``onToken(token)`` once a token passed auth.test. */
export async function showSignIn(root, { notice = "", onToken }) {
  const error = h("p", { class: "notice error", role: "alert", hidden: !notice }, notice);
  const tokenInput = h("input", {
    id: "token",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    placeholder: "xoxp-…",
  });
  const tryToken = async (token) => {
    error.hidden = true;
    try {
      await new WebApi(token).call("auth.test");
    } catch (err) {
      error.hidden = false;
      error.textContent = describeError(err instanceof ApiError ? err.code : "bad_response");
      return;
    }
    onToken(token);
  };
  const people = h("div", { class: "people", role: "group", "aria-label": "Demo team" });
  const demoSection = h(
    "section",
    { hidden: true },
    h("h2", {}, "Sign in as someone from the demo team"),
    people,
  );
  root.replaceChildren(
    h(
      "main",
      { class: "signin" },
      h("h1", {}, "rtm"),
      h("p", {}, "Slack's real-time messaging fleet, in your browser."),
      error,
      demoSection,
      h(
        "form",
        {
          onsubmit: (e) => {
            e.preventDefault();
            tryToken(tokenInput.value.trim());
          },
        },
        h("label", { for: "token" }, "Or sign in with a token"),
        tokenInput,
        h("button", { class: "primary", type: "submit" }, "Sign in"),
      ),
    ),
  );
  const demo = await demoPeople();
  if (demo && demo.users.length) {
    people.replaceChildren(
      ...demo.users.map((user) =>
        h(
          "button",
          { type: "button", "aria-label": `Sign in as ${user.name}`, onclick: () => tryToken(user.token) },
          h("strong", {}, user.name),
          h("br"),
          h("small", {}, user.real_name || ""),
        ),
      ),
    );
    demoSection.hidden = false;
  }
}
