// The websocket side, booted like Slack's client: rtm.connect for a URL, the
// gateway's hello, then events. A goodbye or a close reconnects through
// rtm.connect again, with exponential backoff and jitter; after each hello the
// page catches up by ts through the Web API (see Workspace.catchUp).

import { ApiError, sleep } from "./api.js";
import { isAuthError } from "./errors.js";

export const RECONNECT_BASE_MS = 500;
export const RECONNECT_MAX_MS = 30000;
// A goodbye means "move now": reconnect at once, spread over this much so a
// drained gateway's clients don't arrive at the same instant.
export const GOODBYE_JITTER_MS = 500;
export const PING_INTERVAL_MS = 15000; // a JSON ping; no pong within the timeout closes the socket
export const PONG_TIMEOUT_MS = 10000;
export const HELLO_TIMEOUT_MS = 10000;
export const SEND_TIMEOUT_MS = 10000; // a message not acknowledged by then is reported as not sent

/** Delay before reconnect attempt ``attempt`` (0-based): "equal jitter" on a capped exponential. */
export function backoffDelayMs(attempt, random = Math.random) {
  const ceiling = Math.min(RECONNECT_MAX_MS, RECONNECT_BASE_MS * 2 ** Math.min(attempt, 16));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/**
 * One user's RTM connection. ``handlers``: onEvent(event), onHello(), onStatus({state, detail, delayMs}),
 * onAuthFailed(code). States: "connecting", "connected", "reconnecting".
 */
export class RtmConnection {
  constructor(api, handlers) {
    this.api = api;
    this.handlers = handlers;
    this.ws = null;
    this.nextId = 1;
    this.waiting = new Map(); // id -> {resolve, timer}
    this.stopped = false;
    this.attempt = 0;
    this.connectedOnce = false;
    this.lastUrlHost = "";
  }

  start() {
    this.loop().catch((error) => this.handlers.onStatus({ state: "reconnecting", detail: String(error), delayMs: 0 }));
  }

  stop() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000, "signed out");
  }

  get connected() {
    return Boolean(this.ws && this.ws.readyState === WebSocket.OPEN && this.helloSeen);
  }

  async loop() {
    while (!this.stopped) {
      this.handlers.onStatus({ state: this.connectedOnce ? "reconnecting" : "connecting", detail: "", delayMs: 0 });
      let url;
      try {
        url = (await this.api.call("rtm.connect")).url;
      } catch (error) {
        const code = error instanceof ApiError ? error.code : "fleet_unreachable";
        if (isAuthError(code)) {
          this.handlers.onAuthFailed(code);
          return;
        }
        await this.pause(backoffDelayMs(this.attempt++), code);
        continue;
      }
      const outcome = await this.runSocket(url);
      if (this.stopped) return;
      if (outcome.helloSeen) this.attempt = 0;
      const delayMs = outcome.goodbye
        ? Math.round(Math.random() * GOODBYE_JITTER_MS)
        : backoffDelayMs(this.attempt++);
      await this.pause(delayMs, outcome.goodbye ? "goodbye" : `closed (${outcome.code})`);
    }
  }

  async pause(delayMs, detail) {
    this.handlers.onStatus({ state: "reconnecting", detail, delayMs });
    await sleep(delayMs);
  }

  /** Open ``url``, run it until it closes; resolves {helloSeen, goodbye, code}. */
  runSocket(url) {
    return new Promise((resolve) => {
      const ws = new WebSocket(url);
      this.ws = ws;
      this.helloSeen = false;
      let goodbye = false;
      let sawHello = false;
      let pingTimer = null;
      let pongTimer = null;
      const helloTimer = setTimeout(() => ws.close(4000, "no hello"), HELLO_TIMEOUT_MS);
      const ping = () => {
        if (ws.readyState !== WebSocket.OPEN) return;
        this.sendFrame({ type: "ping" });
        clearTimeout(pongTimer);
        pongTimer = setTimeout(() => ws.close(4000, "no pong"), PONG_TIMEOUT_MS);
      };
      ws.onmessage = (message) => {
        let event;
        try {
          event = JSON.parse(message.data);
        } catch {
          return;
        }
        if (event.type === "hello") {
          clearTimeout(helloTimer);
          this.helloSeen = true;
          sawHello = true;
          this.connectedOnce = true;
          pingTimer = setInterval(ping, PING_INTERVAL_MS);
          this.handlers.onStatus({ state: "connected", detail: "", delayMs: 0 });
          this.handlers.onHello();
          return;
        }
        if (event.type === "pong") {
          clearTimeout(pongTimer);
        }
        if (event.type === "goodbye") {
          goodbye = true; // the gateway closes the socket next; reconnect at once then
        }
        if (event.reply_to !== undefined && this.waiting.has(event.reply_to)) {
          const entry = this.waiting.get(event.reply_to);
          this.waiting.delete(event.reply_to);
          clearTimeout(entry.timer);
          entry.resolve(event);
          return;
        }
        this.handlers.onEvent(event);
      };
      ws.onclose = (close) => {
        clearTimeout(helloTimer);
        clearInterval(pingTimer);
        clearTimeout(pongTimer);
        this.helloSeen = false;
        this.failWaiting("connection_lost");
        resolve({ helloSeen: sawHello, goodbye, code: close.code });
      };
    });
  }

  failWaiting(code) {
    for (const [id, entry] of this.waiting) {
      clearTimeout(entry.timer);
      entry.resolve({ ok: false, reply_to: id, error: code });
    }
    this.waiting.clear();
  }

  /** Send ``frame`` with a fresh id; returns the id, or 0 when not connected. */
  sendFrame(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN || !this.helloSeen) return 0;
    const id = this.nextId++;
    this.ws.send(JSON.stringify({ id, ...frame }));
    return id;
  }

  /** Send and wait for the ``reply_to`` answer: {ok: true, ts} or {ok: false, error}. */
  request(frame) {
    const id = this.sendFrame(frame);
    if (!id) return Promise.resolve({ ok: false, error: "not_connected" });
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        resolve({ ok: false, reply_to: id, error: "timeout" });
      }, SEND_TIMEOUT_MS);
      this.waiting.set(id, { resolve, timer });
    });
  }
}
