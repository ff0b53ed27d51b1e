// The signed-in page: boots like Slack's client (Web API for who, where and what,
// rtm.connect, hello, live events), renders the workspace, and sends what the
// person does: messages over the websocket, everything else through the Web API.

import { ApiError, WebApi, sleep } from "./api.js";
import { describeError, errorCode, isAuthError } from "./errors.js";
import { downloadFile, fileList } from "./files.js";
import { Workspace, compareTs, inTimeline, mentions, maxTs, permalinkTarget } from "./model.js";
import { RtmConnection, backoffDelayMs } from "./rtm.js";
import {
  PICKER_REACTIONS,
  displayed,
  emoji,
  formatText,
  formatTime,
  h,
  highlighted,
  presenceDot,
  reconcile,
} from "./view.js";

export const TOKEN_KEY = "rtm.token";
export const OPEN_KEY = "rtm.open";
export const NOTICE_KEY = "rtm.notice";
export const HISTORY_PAGE = 50; // messages per conversations.history page when reading and scrolling back
export const CATCHUP_PAGE = 200; // per page when catching up after a reconnect
export const MAX_CATCHUP_PAGES = 10; // beyond this the conversation is read afresh
export const MAX_CATCHUP_CONVERSATIONS = 100;
export const LOAD_OLDER_WITHIN_PX = 120; // scrolled this close to the top: read the next older page
export const STICK_TO_BOTTOM_PX = 60;
export const TYPING_SEND_INTERVAL_MS = 3000; // Slack's clients send user_typing every few seconds; the gateway allows 1/s
export const MAX_PRESENCE_IDS = 500;
export const MAX_READ_MARK_LOOKUPS = 30; // conversations whose unread count a boot reads from their read mark
export const READ_MARK_LOOKUPS_IN_FLIGHT = 5; // of those, read at once (each: conversations.info, then history)
// The open conversation is marked read this long after a new message shows there (one mark then
// covers what came meanwhile: each mark is a write and a channel_marked event at the webapp).
export const MARK_READ_DELAY_MS = 3000;
export const SEARCH_PAGE = 20; // matches shown per search (search.messages' count)
export const SEARCH_MAX_CHARS = 500; // the webapp's longest query (webapp_stub/search_query.py)
export const PERMALINK_MAX_PAGES = 20; // a permalink's message is looked for this many older pages back
export const BOOT_RETRY_MAX = 8; // the first retries' backoff grows, then stays at the cap
const PHONE = window.matchMedia("(max-width: 760px)");

export class App {
  constructor(root, token, signOut) {
    this.root = root;
    this.token = token;
    this.signOut = signOut;
    this.ws = null;
    this.rtm = null;
    this.status = { state: "connecting", detail: "", delayMs: 0 };
    this.banner = null; // {text, kind: "error" | "info"}
    this.unreachable = false;
    this.editing = null; // {channel, ts}
    this.picker = null; // ts whose reaction picker is open
    this.linkedTs = null; // the message a permalink opened, shown highlighted
    this.panel = ""; // "", "thread" or "members"
    this.presenceKey = null;
    this.lastTypingSent = new Map();
    this.renderQueued = false;
    this.typingTimer = null;
    this.markTimer = null; // a conversations.mark of the open conversation, due (scheduleMarkRead)
    this.api = new WebApi(token, {
      onRateLimited: (s) => this.showBanner(`rtm asked the page to slow down: waiting ${s} s.`, "info"),
      onReachable: (ok) => this.setReachable(ok),
    });
  }

  // -- boot --------------------------------------------------------------------------------------
  async boot(attempt = 0) {
    this.root.replaceChildren(h("p", { class: "splash", role: "status" }, "Signing in…"));
    try {
      const auth = await this.api.call("auth.test");
      this.ws = new Workspace({ id: auth.user_id, name: auth.user }, { id: auth.team_id, name: auth.team });
      const [users, conversations] = await Promise.all([
        this.api.callPaged("users.list", "members", { limit: 200 }),
        this.api.callPaged("users.conversations", "channels", {
          types: "public_channel,private_channel,mpim,im",
          exclude_archived: true,
          limit: 200,
        }),
      ]);
      for (const user of users) this.ws.users.set(user.id, user);
      for (const info of conversations) this.ws.conversation({ ...info, is_member: true });
    } catch (error) {
      const code = error instanceof ApiError ? error.code : "bad_response";
      if (isAuthError(code)) return this.signOut(describeError(code));
      const delayMs = backoffDelayMs(Math.min(attempt, BOOT_RETRY_MAX));
      this.root.replaceChildren(
        h(
          "div",
          { class: "signin" },
          h("h1", {}, "rtm"),
          h("p", { class: "notice error", role: "alert" }, describeError(code)),
          h("p", {}, `Trying again in ${Math.ceil(delayMs / 1000)} s.`),
          h("button", { class: "primary", onclick: () => this.signOut("") }, "Sign in as someone else"),
        ),
      );
      await sleep(delayMs);
      return this.boot(attempt + 1);
    }
    this.buildShell();
    const link = permalinkTarget(location.pathname, location.search);
    if (link) history.replaceState(null, "", "/"); // opened once; a reload opens the conversation as usual
    const saved = sessionStorage.getItem(OPEN_KEY);
    const members = this.ws.memberConversations();
    const first =
      members.find((c) => c.id === saved) || members.find((c) => c.isGeneral) || members.find((c) => !c.isIm) || members[0];
    if (link) this.openPermalink(link, first);
    else if (first) this.openConversation(first.id);
    await this.loadReadMarks(); // before the socket: its catch-up counts from where this stopped
    this.rtm = new RtmConnection(this.api, {
      onEvent: (event) => this.onEvent(event),
      onHello: () => this.onHello(),
      onStatus: (status) => this.setStatus(status),
      onAuthFailed: (code) => this.signOut(describeError(code)),
    });
    this.rtm.start();
    document.addEventListener("keydown", (e) => this.onKey(e));
    PHONE.addEventListener("change", () => this.render());
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && this.ws.open) this.ws.setOpen(this.ws.openId);
      this.render();
      this.scheduleMarkRead();
    });
  }

  buildShell() {
    const el = (this.el = {});
    el.status = h("span", { class: "status", role: "status", "aria-live": "polite" });
    el.menu = h("button", { class: "menu", "aria-label": "Show conversations", onclick: () => this.toggleNav() }, "☰");
    el.who = h("span", { class: "who" });
    el.channels = h("ul", { "aria-label": "Channels" });
    el.dms = h("ul", { "aria-label": "Direct messages" });
    el.title = h("h1", { id: "conv-title" });
    el.membersButton = h("button", { "aria-label": "Show members", onclick: () => this.togglePanel("members") });
    el.leaveButton = h("button", { onclick: () => this.leave() }, "Leave channel");
    el.banner = h("div", { class: "banner", role: "alert" });
    el.list = h("div", { class: "list" });
    el.older = h("div", { class: "older", "aria-live": "polite" });
    el.messages = h("div", { class: "messages", role: "log", "aria-label": "Messages" }, el.older, el.list);
    el.messages.addEventListener("scroll", () => this.onScroll());
    el.typing = h("div", { class: "typing", "aria-live": "polite" });
    el.input = h("textarea", { id: "composer-input", rows: 1, "aria-label": "Message", placeholder: "Message" });
    el.composer = this.composerForm(el.input, () => this.ws.openId, () => "");
    el.joinBar = h("div", { class: "join-bar" });
    el.threadList = h("div", { class: "list" });
    el.threadInput = h("textarea", { id: "thread-input", rows: 1, "aria-label": "Reply in thread", placeholder: "Reply…" });
    el.thread = h(
      "aside",
      { class: "panel", "aria-label": "Thread", hidden: true },
      h(
        "div",
        { class: "panel-head" },
        h("h2", {}, "Thread"),
        h("button", { "aria-label": "Close thread", onclick: () => this.closePanel() }, "×"),
      ),
      h("div", { class: "messages", role: "log", "aria-label": "Thread messages" }, el.threadList),
      this.composerForm(el.threadInput, () => this.ws.thread && this.ws.thread.channel, () => this.ws.thread && this.ws.thread.ts),
    );
    el.memberList = h("ul", { class: "members", "aria-label": "Members" });
    el.members = h(
      "aside",
      { class: "panel", "aria-label": "Members", hidden: true },
      h(
        "div",
        { class: "panel-head" },
        h("h2", {}, "Members"),
        h("button", { "aria-label": "Close members", onclick: () => this.closePanel() }, "×"),
      ),
      el.memberList,
    );
    el.dialog = h("dialog", { "aria-label": "Dialog" });
    el.app = h(
      "div",
      { class: "app" },
      h(
        "header",
        { class: "topbar" },
        el.menu,
        h("span", { class: "team" }, this.ws.team.name),
        el.status,
        h("span", { class: "spacer" }),
        this.searchForm(),
        el.who,
        h("button", { onclick: () => this.signOut("") }, "Sign out"),
      ),
      h(
        "nav",
        { class: "sidebar", "aria-label": "Conversations" },
        h(
          "section",
          {},
          h(
            "div",
            { class: "section-head" },
            h("h2", {}, "Channels"),
            h("button", { "aria-label": "Create a channel", onclick: () => this.createDialog() }, "+"),
          ),
          el.channels,
          h("button", { class: "browse", onclick: () => this.browseDialog() }, "Browse channels"),
        ),
        h(
          "section",
          {},
          h(
            "div",
            { class: "section-head" },
            h("h2", {}, "Direct messages"),
            h("button", { "aria-label": "New direct message", onclick: () => this.dmDialog() }, "+"),
          ),
          el.dms,
        ),
      ),
      h(
        "main",
        { class: "main", "aria-labelledby": "conv-title" },
        h("div", { class: "conv-head" }, el.title, el.membersButton, el.leaveButton),
        el.banner,
        el.messages,
        el.typing,
        el.joinBar,
        el.composer,
      ),
      el.thread,
      el.members,
      el.dialog,
    );
    this.root.replaceChildren(el.app);
  }

  /** A composer: Enter sends, Shift+Enter is a new line; typing is announced to the channel. */
  composerForm(input, channelOf, threadOf) {
    const submit = () => {
      const text = input.value.trim();
      const channel = channelOf();
      if (!text || !channel) return;
      input.value = "";
      this.send(channel, text, threadOf() || "");
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        submit();
      }
    });
    input.addEventListener("input", () => {
      const channel = channelOf();
      if (channel && input.value.trim()) this.typingIn(channel);
    });
    return h(
      "form",
      {
        class: "composer",
        onsubmit: (e) => {
          e.preventDefault();
          submit();
        },
      },
      input,
      h("button", { type: "submit" }, "Send"),
    );
  }

  // -- the connection ------------------------------------------------------------------------------
  setStatus(status) {
    this.status = status;
    this.render();
  }

  setReachable(ok) {
    if (ok === !this.unreachable) return;
    this.unreachable = !ok;
    this.render();
  }

  async onHello() {
    this.presenceKey = null; // a new connection has no subscription yet
    this.render();
    try {
      await this.catchUp();
    } catch (error) {
      this.showBanner(describeError(error.code || "bad_response"), "error");
    }
  }

  onEvent(event) {
    if (!this.ws) return;
    if (event.type === "error") {
      this.showBanner(describeError(event.error), "error");
      return;
    }
    if (event.type === "channel_left" || event.type === "group_left") {
      if (event.channel === this.ws.openId) this.afterLeaving();
    }
    if (this.ws.apply(event, Date.now(), !document.hidden)) {
      if (event.type === "user_typing") this.scheduleTypingExpiry();
      if (event.type === "message" && event.channel === this.ws.openId) this.scheduleMarkRead();
      this.render();
    }
  }

  /**
   * After every hello: read what the Web API has that this page missed while it was
   * not connected. A conversation already read is read again from its newest message
   * down to the newest it knew (so edits, deletions and reactions on that page are
   * current too); one only counted is asked for what came after its newest ts.
   */
  async catchUp() {
    const convs = this.ws.memberConversations().slice(0, MAX_CATCHUP_CONVERSATIONS);
    for (const conv of convs) {
      if (conv.loaded) await this.syncLoaded(conv);
      else if (conv.latestTs) await this.countSince(conv);
    }
    const thread = this.ws.thread;
    if (thread) await this.loadThread(thread.channel, thread.ts);
    this.render();
  }

  async syncLoaded(conv) {
    const since = conv.latestTs;
    const got = [];
    let cursor = "";
    let low = null;
    for (let page = 0; page < MAX_CATCHUP_PAGES; page++) {
      const reply = await this.api.call("conversations.history", { channel: conv.id, limit: CATCHUP_PAGE, cursor });
      got.push(...reply.messages);
      const oldest = reply.messages.length ? reply.messages[reply.messages.length - 1].ts : "";
      if (!reply.has_more || !since || (oldest && compareTs(oldest, since) <= 0)) {
        low = reply.has_more ? oldest : "";
        break;
      }
      cursor = reply.response_metadata.next_cursor;
    }
    const before = new Set(conv.messages.keys());
    if (low === null) {
      conv.messages.clear(); // too much happened: read it afresh
      conv.loaded = false;
      await this.loadLatest(conv);
    } else {
      conv.reconcile(got, low);
      if (!conv.hasMore && low) conv.hasMore = true;
    }
    for (const message of got) {
      this.ws.settlePending(conv.id, message);
      if (!before.has(message.ts) && since && compareTs(message.ts, since) > 0) this.countUnread(conv, message);
    }
  }

  // -- read marks: unread counts that survive a reload ---------------------------------------------
  // At boot, each conversation's read mark (conversations.info's last_read) and what came after it
  // (at most MAX_READ_MARK_LOOKUPS conversations, one page each); while a conversation is open and
  // the page is looked at, its newest message is marked read (conversations.mark), which the
  // webapp keeps for the next boot and tells the person's other connections (channel_marked).
  async loadReadMarks() {
    const convs = this.ws.memberConversations().slice(0, MAX_READ_MARK_LOOKUPS);
    let authError = "";
    const one = async (conv) => {
      try {
        const info = await this.api.call("conversations.info", { channel: conv.id });
        const lastRead = info.channel.last_read || "";
        if (!lastRead || /^0+\.0+$/.test(lastRead)) return; // never marked: its count starts now, as before
        conv.markedTs = lastRead;
        if (conv.id === this.ws.openId) return; // being read
        conv.latestTs = maxTs(conv.latestTs, lastRead); // the socket's catch-up counts on from here
        await this.countSince(conv);
      } catch (error) {
        const code = error instanceof ApiError ? error.code : "bad_response";
        if (isAuthError(code)) authError = code;
      }
    };
    for (let i = 0; i < convs.length && !authError; i += READ_MARK_LOOKUPS_IN_FLIGHT) {
      await Promise.all(convs.slice(i, i + READ_MARK_LOOKUPS_IN_FLIGHT).map(one));
    }
    if (authError) return this.signOut(describeError(authError));
    this.render();
  }

  scheduleMarkRead() {
    if (this.markTimer !== null) return;
    this.markTimer = setTimeout(() => {
      this.markTimer = null;
      this.markRead();
    }, MARK_READ_DELAY_MS);
  }

  async markRead() {
    const conv = this.ws.open;
    if (!conv || document.hidden || !conv.latestTs || compareTs(conv.latestTs, conv.markedTs || "0") <= 0) return;
    const ts = conv.latestTs;
    try {
      await this.api.call("conversations.mark", { channel: conv.id, ts });
      conv.markedTs = maxTs(conv.markedTs, ts);
    } catch (error) {
      // not marked: the next message or visit tries again
    }
  }

  async countSince(conv) {
    const reply = await this.api.call("conversations.history", {
      channel: conv.id,
      oldest: conv.latestTs,
      limit: CATCHUP_PAGE,
    });
    for (const message of reply.messages) {
      conv.latestTs = maxTs(conv.latestTs, message.ts);
      this.countUnread(conv, message);
    }
  }

  countUnread(conv, message) {
    if (message.user === this.ws.self.id || (conv.id === this.ws.openId && !document.hidden)) return;
    conv.unread += 1;
    if (conv.isIm || mentions(message.text, this.ws.self.id)) conv.mentions += 1;
  }

  // -- conversations ------------------------------------------------------------------------------
  async openConversation(id) {
    this.ws.setOpen(id);
    sessionStorage.setItem(OPEN_KEY, id);
    this.editing = null;
    this.picker = null;
    if (this.panel === "thread") this.panel = "";
    this.el.app.classList.remove("nav-open");
    this.stickToBottom = true;
    this.render();
    const conv = this.ws.open;
    if (!PHONE.matches) this.el.input.focus();
    try {
      if (!conv.loaded) await this.loadLatest(conv);
      if (this.panel === "members") await this.loadMembers(conv);
    } catch (error) {
      this.showBanner(describeError(error.code), "error");
    }
    this.render();
    this.scheduleMarkRead();
  }

  // A permalink (chat.getPermalink) opens its conversation at its message: older pages are read
  // until the message is there (at most PERMALINK_MAX_PAGES), which is then shown highlighted;
  // a reply's link also opens its thread.
  async openPermalink(link, fallback) {
    const conv = this.ws.memberConversations().find((c) => c.id === link.channel);
    if (!conv) {
      if (fallback) this.openConversation(fallback.id);
      this.showBanner("That link is to a conversation you are not in, or that does not exist.", "error");
      return;
    }
    const timelineTs = link.threadTs || link.ts;
    this.linkedTs = timelineTs;
    await this.openConversation(conv.id);
    for (let page = 0; page < PERMALINK_MAX_PAGES && !conv.messages.has(timelineTs) && conv.hasMore; page++) {
      if (this.loadingOlder) await sleep(100); // the page's own scroll is reading one
      else await this.loadOlder(conv);
    }
    if (!conv.messages.has(timelineTs)) {
      this.linkedTs = null;
      this.showBanner("That message was not found: it was deleted, or is too far back.", "error");
      return;
    }
    this.stickToBottom = false;
    this.renderNow();
    const article = this.el.list.querySelector(`article[data-ts="${timelineTs}"]`);
    if (article) article.scrollIntoView({ block: "center" });
    if (link.threadTs) {
      this.linkedTs = link.ts;
      await this.openThread(link.channel, link.threadTs);
    }
  }

  async loadLatest(conv) {
    const reply = await this.api.call("conversations.history", { channel: conv.id, limit: HISTORY_PAGE });
    const messages = reply.messages;
    conv.reconcile(messages, reply.has_more && messages.length ? messages[messages.length - 1].ts : "");
    conv.hasMore = reply.has_more;
    conv.cursor = reply.response_metadata.next_cursor;
    conv.loaded = true;
    this.stickToBottom = conv.id === this.ws.openId ? true : this.stickToBottom;
  }

  async loadOlder(conv) {
    if (this.loadingOlder || !conv.hasMore || !conv.cursor) return;
    this.loadingOlder = true;
    this.render();
    const box = this.el.messages;
    const fromBottom = box.scrollHeight - box.scrollTop;
    try {
      const reply = await this.api.call("conversations.history", {
        channel: conv.id,
        limit: HISTORY_PAGE,
        cursor: conv.cursor,
      });
      for (const message of reply.messages) conv.put(message);
      conv.hasMore = reply.has_more;
      conv.cursor = reply.response_metadata.next_cursor;
    } catch (error) {
      this.showBanner(describeError(error.code), "error");
    } finally {
      this.loadingOlder = false;
    }
    this.renderNow();
    box.scrollTop = box.scrollHeight - fromBottom; // keep what the person was reading where it was
  }

  async loadMembers(conv) {
    conv.members = await this.api.callPaged("conversations.members", "members", { channel: conv.id, limit: 200 });
  }

  async loadThread(channel, ts) {
    const messages = await this.api.callPaged("conversations.replies", "messages", { channel, ts, limit: 200 });
    if (!this.ws.thread || this.ws.thread.ts !== ts) return;
    this.ws.thread.messages = new Map(messages.map((m) => [m.ts, m]));
    this.ws.thread.loaded = true;
  }

  async openThread(channel, ts) {
    this.ws.thread = { channel, ts, messages: new Map(), loaded: false };
    this.panel = "thread";
    this.render();
    try {
      await this.loadThread(channel, ts);
    } catch (error) {
      this.showBanner(describeError(error.code), "error");
    }
    this.render();
    this.el.threadInput.focus();
  }

  async togglePanel(which) {
    if (this.panel === which) return this.closePanel();
    this.panel = which;
    this.render();
    if (which === "members" && this.ws.open) {
      try {
        await this.loadMembers(this.ws.open);
      } catch (error) {
        this.showBanner(describeError(error.code), "error");
      }
      this.render();
    }
  }

  closePanel() {
    if (this.panel === "thread") this.ws.thread = null;
    this.panel = "";
    this.render();
    if (!PHONE.matches) this.el.input.focus();
  }

  toggleNav() {
    this.el.app.classList.toggle("nav-open");
    this.render();
  }

  async leave() {
    const conv = this.ws.open;
    if (!conv) return;
    await this.act(async () => {
      await this.api.call("conversations.leave", { channel: conv.id });
      conv.isMember = false;
      this.afterLeaving();
    });
  }

  afterLeaving() {
    const general = this.ws.memberConversations().find((c) => c.isGeneral && c.id !== this.ws.openId);
    if (general) this.openConversation(general.id);
  }

  async join(id) {
    await this.act(async () => {
      const reply = await this.api.call("conversations.join", { channel: id });
      this.ws.conversation({ ...reply.channel, is_member: true });
      await this.openConversation(id);
    });
  }

  /** Run a Web API action; its error goes to the banner in words. */
  async act(fn) {
    try {
      await fn();
      this.clearBanner();
    } catch (error) {
      this.showBanner(describeError(error.code || "bad_response"), "error");
    }
    this.render();
  }

  // -- sending -------------------------------------------------------------------------------------
  /** ``@name`` of a known person becomes ``<@U…>`` (what mention counts look for). */
  encodeMentions(text) {
    const byName = new Map([...this.ws.users.values()].map((u) => [u.name, u.id]));
    return text.replace(/(^|\s)@([a-z0-9._-]+)/gi, (all, space, name) =>
      byName.has(name) ? `${space}<@${byName.get(name)}>` : all,
    );
  }

  send(channel, text, threadTs) {
    const entry = this.ws.addPending(channel, this.encodeMentions(text), threadTs);
    this.lastTypingSent.delete(channel);
    this.stickToBottom = true;
    this.render();
    this.transmit(entry);
  }

  async transmit(entry) {
    entry.state = "pending";
    entry.error = "";
    this.render();
    const frame = { type: "message", channel: entry.channel, text: entry.text };
    if (entry.thread_ts) frame.thread_ts = entry.thread_ts;
    const reply = await this.rtm.request(frame);
    this.ws.acknowledge(entry.id, reply.ok ? reply : { ok: false, error: errorCode(reply.error) });
    this.render();
  }

  typingIn(channel) {
    const now = Date.now();
    if (now - (this.lastTypingSent.get(channel) || 0) < TYPING_SEND_INTERVAL_MS) return;
    if (this.rtm && this.rtm.sendFrame({ type: "typing", channel })) this.lastTypingSent.set(channel, now);
  }

  async toggleReaction(channel, message, name) {
    const mine = (message.reactions || []).some((r) => r.name === name && r.users.includes(this.ws.self.id));
    this.picker = null;
    await this.act(() =>
      this.api.call(mine ? "reactions.remove" : "reactions.add", { channel, timestamp: message.ts, name }),
    );
  }

  /** A file of a message: downloaded with the token (files.js), saved by the browser. */
  async openFile(file) {
    try {
      await downloadFile(this.api.token, file);
    } catch (err) {
      this.showBanner(describeError(err.code || "bad_response"), "error");
    }
  }

  async saveEdit(channel, ts, text) {
    await this.act(async () => {
      await this.api.call("chat.update", { channel, ts, text: this.encodeMentions(text) });
      this.editing = null;
    });
  }

  async remove(channel, ts) {
    if (!window.confirm("Delete this message? This can't be undone.")) return;
    await this.act(() => this.api.call("chat.delete", { channel, ts }));
  }

  // -- dialogs --------------------------------------------------------------------------------------
  openDialog(title, ...content) {
    const dialog = this.el.dialog;
    dialog.setAttribute("aria-label", title);
    dialog.replaceChildren(h("h2", {}, title), ...content);
    if (!dialog.open) dialog.showModal();
    return dialog;
  }

  createDialog() {
    const name = h("input", { id: "new-channel-name", required: true, maxlength: 80, autocomplete: "off" });
    const error = h("p", { class: "notice error", role: "alert", hidden: true });
    const form = h(
      "form",
      {
        onsubmit: async (e) => {
          e.preventDefault();
          try {
            const reply = await this.api.call("conversations.create", { name: name.value.trim() });
            this.ws.conversation({ ...reply.channel, is_member: true });
            this.el.dialog.close();
            await this.openConversation(reply.channel.id);
          } catch (err) {
            error.hidden = false;
            error.textContent = describeError(err.code || "bad_response");
          }
        },
      },
      h("label", { for: "new-channel-name" }, "Name"),
      name,
      error,
      h(
        "div",
        { class: "row" },
        h("button", { type: "button", onclick: () => this.el.dialog.close() }, "Cancel"),
        h("button", { type: "submit" }, "Create"),
      ),
    );
    this.openDialog("Create a channel", form);
    name.focus();
  }

  // Message search (search.messages): a box in the top bar; its matches in a dialog, each opening
  // its message as its permalink does (a public channel one is not in opens as a preview).
  searchForm() {
    const input = h("input", {
      type: "search",
      id: "search-input",
      placeholder: "Search messages",
      "aria-label": "Search messages",
      maxlength: SEARCH_MAX_CHARS,
      autocomplete: "off",
    });
    const submit = (e) => {
      e.preventDefault();
      const query = input.value.trim();
      if (query) this.searchDialog(query);
    };
    return h("form", { class: "search", role: "search", onsubmit: submit }, input);
  }

  async searchDialog(query) {
    const list = h("ul", { class: "matches", "aria-label": "Search results" });
    const close = h("button", { type: "button", onclick: () => this.el.dialog.close() }, "Close");
    this.openDialog(`Search: ${query}`, list, h("div", { class: "row" }, close));
    list.append(h("li", {}, "Searching…"));
    try {
      const reply = await this.api.call("search.messages", { query, count: SEARCH_PAGE, highlight: true });
      const matches = reply.messages.matches;
      const items = matches.map((match) => {
        const where = match.channel.is_im ? this.ws.userName(match.channel.name) : `#${match.channel.name}`;
        const open = () => (this.el.dialog.close(), this.openMatch(match));
        return h(
          "li",
          {},
          h(
            "button",
            { class: "match", onclick: open },
            h("span", { class: "label" }, `${where} · ${match.username || this.ws.userName(match.user)}`),
            h("span", { class: "text" }, highlighted(match.text)),
          ),
        );
      });
      const total = reply.messages.total;
      const said = total > matches.length ? `${matches.length} of ${total} shown` : `${total} found`;
      list.replaceChildren(h("li", { class: "notice", role: "status" }, total ? said : "Nothing found."), ...items);
    } catch (error) {
      list.replaceChildren(h("li", { class: "notice error", role: "alert" }, describeError(error.code)));
    }
  }

  openMatch(match) {
    const url = new URL(match.permalink, location.href);
    const link = permalinkTarget(url.pathname, url.search);
    if (link && this.ws.memberConversations().some((c) => c.id === link.channel)) {
      this.openPermalink(link, null);
      return;
    }
    const conv = this.ws.conversation({ ...match.channel, is_member: false });
    this.openConversation(conv.id);
  }

  async browseDialog() {
    const list = h("ul", { "aria-label": "Public channels" });
    const close = h("button", { type: "button", onclick: () => this.el.dialog.close() }, "Close");
    this.openDialog("Browse channels", list, h("div", { class: "row" }, close));
    list.append(h("li", {}, "Loading…"));
    try {
      const channels = await this.api.callPaged("conversations.list", "channels", {
        types: "public_channel",
        exclude_archived: true,
        limit: 200,
      });
      list.replaceChildren(
        ...channels.map((info) => {
          const conv = this.ws.conversation(info);
          const button = conv.isMember
            ? h("button", { onclick: () => (this.el.dialog.close(), this.openConversation(conv.id)) }, "Open")
            : h("button", { onclick: () => (this.el.dialog.close(), this.join(conv.id)) }, `Join #${conv.name}`);
          const preview = h(
            "button",
            { onclick: () => (this.el.dialog.close(), this.openConversation(conv.id)) },
            "Preview",
          );
          return h("li", {}, h("span", { class: "label" }, `#${conv.name}`), conv.isMember ? null : preview, button);
        }),
      );
    } catch (error) {
      list.replaceChildren(h("li", { class: "notice error", role: "alert" }, describeError(error.code)));
    }
  }

  dmDialog() {
    const people = [...this.ws.users.values()].filter((u) => !u.deleted);
    const list = h(
      "ul",
      { "aria-label": "People" },
      people.map((user) =>
        h(
          "li",
          {},
          h("span", { class: "label" }, user.id === this.ws.self.id ? `${user.name} (you)` : user.name),
          h(
            "button",
            { onclick: () => (this.el.dialog.close(), this.openDm(user.id)) },
            `Message ${user.name}`,
          ),
        ),
      ),
    );
    this.openDialog(
      "New direct message",
      list,
      h("div", { class: "row" }, h("button", { type: "button", onclick: () => this.el.dialog.close() }, "Close")),
    );
  }

  async openDm(userId) {
    await this.act(async () => {
      const reply = await this.api.call("conversations.open", { users: userId, return_im: true });
      this.ws.conversation({ ...reply.channel, user: reply.channel.user || userId, is_im: true });
      await this.openConversation(reply.channel.id);
    });
  }

  // -- keyboard and scrolling -------------------------------------------------------------------------
  onKey(e) {
    if (e.key !== "Escape" || e.defaultPrevented) return;
    if (this.el.dialog.open) return; // the dialog closes itself
    if (this.editing) {
      this.editing = null;
    } else if (this.picker) {
      this.picker = null;
    } else if (this.panel) {
      this.closePanel();
      return;
    } else if (this.el.app.classList.contains("nav-open")) {
      this.el.app.classList.remove("nav-open");
    }
    this.render();
  }

  onScroll() {
    const box = this.el.messages;
    this.stickToBottom = box.scrollHeight - box.scrollTop - box.clientHeight < STICK_TO_BOTTOM_PX;
    const conv = this.ws.open;
    if (conv && box.scrollTop < LOAD_OLDER_WITHIN_PX) this.loadOlder(conv);
  }

  // -- banner ---------------------------------------------------------------------------------------
  showBanner(text, kind = "error") {
    this.banner = { text, kind };
    this.render();
  }

  clearBanner() {
    this.banner = null;
  }

  scheduleTypingExpiry() {
    if (this.typingTimer) return;
    this.typingTimer = setInterval(() => {
      const any = [...this.ws.typing.keys()].some((c) => this.ws.typers(c).length);
      this.render();
      if (!any) {
        clearInterval(this.typingTimer);
        this.typingTimer = null;
      }
    }, 1000);
  }

  // -- rendering ----------------------------------------------------------------------------------
  render() {
    if (this.renderQueued || !this.el) return;
    this.renderQueued = true;
    setTimeout(() => {
      this.renderQueued = false;
      this.renderNow();
    }, 0);
  }

  renderNow() {
    const ws = this.ws;
    const el = this.el;
    const conv = ws.open;
    const box = el.messages;
    const atBottom = this.stickToBottom || box.scrollHeight - box.scrollTop - box.clientHeight < STICK_TO_BOTTOM_PX;

    const statusText = {
      connected: "Connected",
      connecting: "Connecting…",
      reconnecting: "reconnecting…",
    }[this.status.state];
    el.status.dataset.state = this.status.state;
    el.status.textContent = statusText;
    el.who.replaceChildren(presenceDot(ws.self.id, ws.presenceOf(ws.self.id), ws.self.name), ` ${ws.self.name}`);

    this.renderSidebar();

    el.title.textContent = conv ? (conv.kind === "channel" ? `#${conv.name}` : ws.displayName(conv)) : "";
    el.membersButton.textContent = conv && conv.members ? `Members (${conv.members.length})` : "Members";
    el.membersButton.setAttribute("aria-expanded", String(this.panel === "members"));
    el.leaveButton.hidden = !conv || conv.kind !== "channel" || !conv.isMember || conv.isGeneral;

    const banners = [];
    if (this.unreachable) banners.push({ text: describeError("fleet_unreachable"), kind: "error" });
    else if (this.status.state === "reconnecting") {
      const wait = this.status.delayMs > 1000 ? ` (next try in ${Math.ceil(this.status.delayMs / 1000)} s)` : "";
      banners.push({ text: `reconnecting…${wait}`, kind: "info" });
    }
    if (this.banner) banners.push(this.banner);
    el.banner.replaceChildren(
      ...banners.map((b) =>
        h(
          "div",
          { class: b.kind === "error" ? "notice error" : "notice" },
          b.text,
          b === this.banner
            ? h("button", { "aria-label": "Dismiss", onclick: () => ((this.banner = null), this.render()) }, "×")
            : null,
        ),
      ),
    );

    if (conv) {
      el.older.textContent = this.loadingOlder
        ? "Loading older messages…"
        : conv.loaded && !conv.hasMore
          ? conv.kind === "channel"
            ? `This is the very beginning of #${conv.name}.`
            : "This is the very beginning of this conversation."
          : "";
      const items = [...conv.ordered(), ...ws.pendingIn(conv.id)];
      this.renderMessages(el.list, conv.id, items, false);
      const typers = ws.typers(conv.id).map((u) => ws.userName(u));
      el.typing.textContent = !typers.length
        ? ""
        : typers.length === 1
          ? `${typers[0]} is typing…`
          : `${typers.slice(0, -1).join(", ")} and ${typers[typers.length - 1]} are typing…`;
      const member = conv.isMember;
      el.composer.hidden = !member;
      el.joinBar.hidden = member;
      el.input.setAttribute("aria-label", `Message ${el.title.textContent}`);
      el.input.placeholder = `Message ${el.title.textContent}`;
      if (!member) {
        el.joinBar.replaceChildren(
          h("span", {}, `You're previewing #${conv.name}.`),
          h("button", { onclick: () => this.join(conv.id) }, "Join channel"),
        );
      }
    }

    el.thread.hidden = this.panel !== "thread" || !ws.thread;
    if (!el.thread.hidden) {
      const thread = ws.thread;
      const items = [...thread.messages.values()].sort((a, b) => compareTs(a.ts, b.ts));
      this.renderMessages(el.threadList, thread.channel, [...items, ...ws.pendingIn(thread.channel, thread.ts)], true);
    }
    el.members.hidden = this.panel !== "members";
    if (!el.members.hidden && conv) this.renderMembers(conv);

    if (atBottom) box.scrollTop = box.scrollHeight;
    this.updatePresenceSubscription();
  }

  renderSidebar() {
    const ws = this.ws;
    const convs = ws.memberConversations();
    const item = (conv) => conv;
    const options = {
      key: (conv) => conv.id,
      create: () => h("li"),
      sign: (conv) =>
        JSON.stringify([
          ws.displayName(conv),
          conv.unread,
          conv.mentions,
          conv.id === ws.openId,
          conv.isIm ? ws.presenceOf(conv.peer) : "",
        ]),
      fill: (li, conv) => {
        const name = conv.kind === "channel" ? `# ${conv.name}` : ws.displayName(conv);
        const label = [name.replace("# ", "#")];
        if (conv.mentions) label.push(`${conv.mentions} mentions`);
        else if (conv.unread) label.push(`${conv.unread} unread`);
        li.replaceChildren(
          h(
            "button",
            {
              class: conv.unread ? "has-unread" : "",
              "aria-current": conv.id === ws.openId ? "true" : "false",
              "aria-label": label.join(", "),
              dataset: { conversation: conv.id },
              onclick: () => this.openConversation(conv.id),
            },
            conv.isIm ? presenceDot(conv.peer, ws.presenceOf(conv.peer), ws.userName(conv.peer)) : null,
            h("span", { class: "label" }, name),
            conv.mentions
              ? h("span", { class: "badge", dataset: { mentions: conv.mentions } }, String(conv.mentions))
              : conv.unread
                ? h("span", { class: "unread-count", dataset: { unread: conv.unread } }, String(conv.unread))
                : null,
          ),
        );
      },
    };
    const byName = (a, b) => ws.displayName(a).localeCompare(ws.displayName(b));
    reconcile(this.el.channels, convs.filter((c) => c.kind === "channel").sort(byName).map(item), options);
    reconcile(this.el.dms, convs.filter((c) => c.kind !== "channel").sort(byName).map(item), options);
  }

  renderMembers(conv) {
    const ws = this.ws;
    const ids = conv.members || [];
    reconcile(this.el.memberList, ids, {
      key: (id) => id,
      create: () => h("li"),
      sign: (id) => `${ws.userName(id)}|${ws.presenceOf(id)}`,
      fill: (li, id) =>
        li.replaceChildren(
          presenceDot(id, ws.presenceOf(id), ws.userName(id)),
          h("span", {}, id === ws.self.id ? `${ws.userName(id)} (you)` : ws.userName(id)),
          id === ws.self.id ? null : h("button", { onclick: () => this.openDm(id) }, `Message ${ws.userName(id)}`),
        ),
    });
    if (!ids.length) this.el.memberList.replaceChildren(h("li", {}, conv.members ? "Nobody" : "Loading…"));
  }

  renderMessages(container, channel, items, inThread) {
    const ws = this.ws;
    reconcile(container, items, {
      key: (m) => (m.ts ? m.ts : `pending-${m.id}`),
      create: () => h("article", { class: "msg", tabindex: "-1" }), // a tap focuses it: its actions show
      sign: (m) =>
        JSON.stringify([
          m.text,
          m.edited,
          m.reactions,
          (m.files || []).map((f) => [f.id, f.mode]),
          m.reply_count,
          m.state,
          m.error,
          ws.userName(m.user || ws.self.id),
          ws.presenceOf(m.user || ws.self.id),
          this.editing && this.editing.ts === m.ts,
          this.picker === m.ts && !!m.ts,
          inThread,
          this.linkedTs === m.ts,
        ]),
      fill: (article, m) => this.fillMessage(article, channel, m, inThread),
    });
  }

  fillMessage(article, channel, m, inThread) {
    const ws = this.ws;
    const pending = !m.ts;
    const user = pending ? ws.self.id : m.user;
    const name = m.bot_id && !ws.users.has(user) ? "bot" : ws.userName(user);
    const mine = user === ws.self.id;
    article.className = mentions(m.text, ws.self.id) ? "msg mentions-me" : "msg";
    if (m.ts && m.ts === this.linkedTs) article.classList.add("linked");
    if (pending) article.dataset.state = m.state;
    else {
      delete article.dataset.state;
      article.dataset.ts = m.ts;
    }
    article.dataset.user = user;
    const text = h(
      "div",
      { class: "msg-text" },
      formatText(m.text, {
        userName: (id) => ws.userName(id),
        channelName: (id) => (ws.conversations.get(id) || { name: id }).name,
        selfId: ws.self.id,
      }),
    );
    const head = h(
      "div",
      { class: "msg-head" },
      presenceDot(user, ws.presenceOf(user), name),
      h("strong", { class: "author" }, name),
      pending ? null : h("time", { datetime: new Date(Number(m.ts.split(".")[0]) * 1000).toISOString() }, formatTime(m.ts)),
      m.edited ? h("span", { class: "edited" }, "(edited)") : null,
    );
    let body = text;
    if (this.editing && this.editing.ts === m.ts) {
      const box = h("textarea", { "aria-label": "Edit message", value: m.text });
      box.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
          e.preventDefault();
          this.saveEdit(channel, m.ts, box.value.trim());
        } else if (e.key === "Escape") {
          e.preventDefault();
          this.editing = null;
          this.render();
        }
      });
      body = h(
        "div",
        { class: "edit-box" },
        box,
        h(
          "div",
          {},
          h("button", { onclick: () => this.saveEdit(channel, m.ts, box.value.trim()) }, "Save"),
          h("button", { onclick: () => ((this.editing = null), this.render()) }, "Cancel"),
        ),
      );
      setTimeout(() => box.focus(), 0);
    }
    const parts = [head, body];
    if (pending) {
      parts.push(
        h(
          "div",
          { class: "send-state", role: m.state === "failed" ? "alert" : "status" },
          m.state === "failed" ? `Not sent: ${describeError(m.error)}` : "Sending…",
          m.state === "failed" ? h("button", { onclick: () => this.transmit(m) }, "Retry") : null,
          m.state === "failed"
            ? h("button", { onclick: () => (ws.pending.delete(m.id), this.render()) }, "Discard")
            : null,
        ),
      );
      article.replaceChildren(...parts);
      return;
    }
    if (Array.isArray(m.files) && m.files.length) parts.push(fileList(m.files, (f) => this.openFile(f)));
    if (m.reactions && m.reactions.length) {
      parts.push(
        h(
          "div",
          { class: "reactions" },
          m.reactions.map((r) => {
            const pressed = r.users.includes(ws.self.id);
            return h(
              "button",
              {
                class: "reaction",
                "aria-pressed": String(pressed),
                "aria-label": `${r.name}: ${r.count} (${r.users.map((u) => ws.userName(u)).join(", ")})`,
                dataset: { reaction: r.name, count: r.count },
                onclick: () => this.toggleReaction(channel, m, r.name),
              },
              `${emoji(r.name)} ${r.count}`,
            );
          }),
        ),
      );
    }
    if (!inThread && m.reply_count) {
      parts.push(
        h(
          "button",
          { class: "thread-link", onclick: () => this.openThread(channel, m.ts) },
          `${m.reply_count} ${m.reply_count === 1 ? "reply" : "replies"}`,
        ),
      );
    }
    if (this.picker === m.ts) {
      parts.push(
        h(
          "div",
          { class: "picker", role: "group", "aria-label": "Pick a reaction" },
          PICKER_REACTIONS.map((r) =>
            h("button", { "aria-label": `React with ${r}`, onclick: () => this.toggleReaction(channel, m, r) }, emoji(r)),
          ),
        ),
      );
    }
    const actions = [
      h(
        "button",
        { "aria-label": "Add reaction", onclick: () => ((this.picker = this.picker === m.ts ? null : m.ts), this.render()) },
        "React",
      ),
    ];
    if (!inThread && inTimeline(m)) {
      actions.push(h("button", { "aria-label": "Reply in thread", onclick: () => this.openThread(channel, m.ts) }, "Reply"));
    }
    if (mine) {
      actions.push(
        h("button", { "aria-label": "Edit message", onclick: () => ((this.editing = { channel, ts: m.ts }), this.render()) }, "Edit"),
        h("button", { "aria-label": "Delete message", onclick: () => this.remove(channel, m.ts) }, "Delete"),
      );
    }
    parts.push(h("div", { class: "actions", role: "toolbar", "aria-label": "Message actions" }, actions));
    article.replaceChildren(...parts);
  }

  /**
   * Presence for exactly the users on screen: every shown dot names its user, and the
   * set of displayed dots is the subscription (presence_sub replaces the set; the
   * gateway answers with presence_change for the users added).
   */
  updatePresenceSubscription() {
    if (!this.rtm || !this.rtm.connected) return;
    const ids = new Set();
    for (const dot of this.root.querySelectorAll("[data-presence-user]")) {
      if (displayed(dot)) ids.add(dot.dataset.presenceUser);
    }
    const sorted = [...ids].sort().slice(0, MAX_PRESENCE_IDS);
    const key = sorted.join(",");
    if (key === this.presenceKey) return;
    if (this.rtm.sendFrame({ type: "presence_sub", ids: sorted })) this.presenceKey = key;
  }
}
