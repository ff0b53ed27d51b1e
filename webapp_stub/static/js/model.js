// What the page knows, without the DOM: conversations and their messages keyed by
// ts (so a message seen live and again in history is one message), threads,
// unread and mention counts, typing, presence, and messages being sent.
// Plain classes, events in, state out; tests drive them in the browser.

export const TYPING_SHOWN_MS = 6000; // an indicator lasts this long unless refreshed or the message arrives
export const MAX_MESSAGES_PER_CONVERSATION = 5000; // older ones are dropped (scrolling back reloads them)

/** Compare two Slack ts strings ("1700000000.000100") as numbers, exactly. */
export function compareTs(a, b) {
  const [as, au = ""] = String(a).split(".");
  const [bs, bu = ""] = String(b).split(".");
  if (as.length !== bs.length) return as.length - bs.length;
  if (as !== bs) return as < bs ? -1 : 1;
  const ap = au.padEnd(6, "0");
  const bp = bu.padEnd(6, "0");
  return ap === bp ? 0 : ap < bp ? -1 : 1;
}

export const maxTs = (a, b) => (!a ? b : !b ? a : compareTs(a, b) >= 0 ? a : b);

/** Whether a message belongs in the channel's own timeline (not only in a thread). */
export function inTimeline(message) {
  return !message.thread_ts || message.thread_ts === message.ts || message.subtype === "thread_broadcast";
}

/** A permalink's target (chat.getPermalink: ``/archives/<channel>/p<ts digits>``, and
 * ``?thread_ts=`` for a reply), or null for any other path. */
export function permalinkTarget(pathname, search) {
  const match = /^\/archives\/([CDG][A-Z0-9]{1,39})\/p([0-9]{10})([0-9]{6})$/.exec(pathname);
  if (!match) return null;
  const threadTs = new URLSearchParams(search).get("thread_ts");
  const ts = `${match[2]}.${match[3]}`;
  const isTs = (value) => typeof value === "string" && /^[0-9]{10}\.[0-9]{6}$/.test(value);
  return { channel: match[1], ts, threadTs: isTs(threadTs) && threadTs !== ts ? threadTs : null };
}

export function mentions(text, userId) {
  return typeof text === "string" && text.includes(`<@${userId}>`);
}

export class Conversation {
  constructor(info) {
    this.id = info.id;
    this.messages = new Map(); // ts -> message (the timeline)
    this.deleted = new Set(); // ts of messages deleted while we watched (a late history page can't revive them)
    this.loaded = false; // the newest page has been read
    this.hasMore = true; // older pages exist
    this.cursor = ""; // for the next older page
    this.latestTs = ""; // newest ts seen in this conversation, from history or live
    this.unread = 0;
    this.mentions = 0;
    this.markedTs = ""; // the read position the webapp holds (conversations.info's last_read, moved by conversations.mark)
    this.members = null; // ids, when read
    this.countedReplies = new Set(); // ts of thread replies already added to their parent's reply_count
    this.update(info);
  }

  update(info) {
    this.name = info.name || this.name || info.id;
    this.isIm = Boolean(info.is_im ?? this.isIm);
    this.isMpim = Boolean(info.is_mpim ?? this.isMpim);
    this.isPrivate = Boolean(info.is_private ?? this.isPrivate);
    this.isArchived = Boolean(info.is_archived ?? this.isArchived);
    this.isGeneral = Boolean(info.is_general ?? this.isGeneral);
    if (info.user) this.peer = info.user;
    if (info.is_member !== undefined) this.isMember = Boolean(info.is_member);
    if (this.isIm || this.isMpim) this.isMember = true;
  }

  get kind() {
    return this.isIm ? "im" : this.isMpim ? "mpim" : "channel";
  }

  /** Timeline messages oldest first. */
  ordered() {
    return [...this.messages.values()].sort((a, b) => compareTs(a.ts, b.ts));
  }

  /** Add or replace one message; returns true if it was new. */
  put(message) {
    if (!message || !message.ts || this.deleted.has(message.ts) || !inTimeline(message)) return false;
    const old = this.messages.get(message.ts);
    this.messages.set(message.ts, old ? { ...old, ...message } : message);
    this.latestTs = maxTs(this.latestTs, message.ts);
    if (this.messages.size > MAX_MESSAGES_PER_CONVERSATION) {
      const oldest = this.ordered()[0];
      this.messages.delete(oldest.ts);
      this.hasMore = true;
    }
    return !old;
  }

  /**
   * A history page (newest first, as conversations.history gives it) that is the
   * truth for every ts from ``lowTs`` up (exclusive; "" means everything): local
   * messages in that range that the page lacks were deleted meanwhile.
   */
  reconcile(messages, lowTs) {
    const seen = new Set(messages.map((m) => m.ts));
    for (const ts of [...this.messages.keys()]) {
      if (!seen.has(ts) && (!lowTs || compareTs(ts, lowTs) > 0)) this.messages.delete(ts);
    }
    for (const message of messages) this.put(message);
  }
}

export class Workspace {
  constructor(self, team) {
    this.self = self; // {id, name}
    this.team = team;
    this.users = new Map(); // id -> user object
    this.conversations = new Map(); // id -> Conversation (members' conversations and browsed channels)
    this.openId = "";
    this.thread = null; // {channel, ts, messages: Map, loaded}
    this.typing = new Map(); // channel -> Map(user -> expires at, ms)
    this.presence = new Map(); // user -> "active" | "away"
    this.pending = new Map(); // local id -> {key, channel, thread_ts, text, state: "pending"|"failed", error}
    this.nextLocalId = 1;
  }

  userName(id) {
    const user = this.users.get(id);
    return user ? user.name : id;
  }

  conversation(info) {
    let conv = this.conversations.get(info.id);
    if (conv) conv.update(info);
    else this.conversations.set(info.id, (conv = new Conversation(info)));
    return conv;
  }

  get open() {
    return this.conversations.get(this.openId) || null;
  }

  displayName(conv) {
    if (conv.isIm) return conv.peer === this.self.id ? `${this.self.name} (you)` : this.userName(conv.peer);
    if (conv.isMpim && conv.members) {
      return conv.members
        .filter((id) => id !== this.self.id)
        .map((id) => this.userName(id))
        .join(", ");
    }
    return conv.name;
  }

  memberConversations() {
    return [...this.conversations.values()].filter((c) => c.isMember && !c.isArchived);
  }

  setOpen(id) {
    this.openId = id;
    const conv = this.open;
    if (conv) {
      conv.unread = 0;
      conv.mentions = 0;
    }
    if (this.thread && this.thread.channel !== id) this.thread = null;
  }

  // -- live events ------------------------------------------------------------------------------
  /** Apply one RTM event; ``visible`` says whether the page is being looked at (for unread counts). */
  apply(event, now = Date.now(), visible = true) {
    switch (event.type) {
      case "message":
        return this.applyMessage(event, now, visible);
      case "reaction_added":
      case "reaction_removed":
        return this.applyReaction(event);
      case "user_typing": {
        if (event.user === this.self.id) return false;
        if (!this.typing.has(event.channel)) this.typing.set(event.channel, new Map());
        this.typing.get(event.channel).set(event.user, now + TYPING_SHOWN_MS);
        return true;
      }
      case "presence_change": {
        for (const user of event.users || [event.user]) this.presence.set(user, event.presence);
        return true;
      }
      case "channel_created":
        this.conversation({ ...event.channel, is_member: event.channel.creator === this.self.id });
        return true;
      case "channel_joined":
      case "group_joined":
      case "mpim_joined":
        this.conversation({ ...event.channel, is_member: true });
        return true;
      case "im_created":
        this.conversation({ ...event.channel, user: event.user, is_im: true });
        return true;
      case "channel_left":
      case "group_left": {
        const conv = this.conversations.get(event.channel);
        if (!conv) return false;
        conv.isMember = false;
        if (conv.isPrivate) this.conversations.delete(conv.id);
        return true;
      }
      case "channel_rename":
      case "group_rename":
        this.conversation(event.channel);
        return true;
      case "channel_archive":
      case "channel_unarchive": {
        const conv = this.conversations.get(event.channel);
        if (conv) conv.isArchived = event.type === "channel_archive";
        return Boolean(conv);
      }
      case "channel_marked": // this person read it in another tab or client (conversations.mark)
      case "group_marked":
      case "im_marked": {
        const conv = this.conversations.get(event.channel);
        if (!conv || typeof event.ts !== "string") return false;
        conv.markedTs = maxTs(conv.markedTs, event.ts);
        if (compareTs(event.ts, conv.latestTs || "0") >= 0) {
          conv.unread = 0; // read up to its newest message there: nothing unread here either
          conv.mentions = 0;
        }
        return true;
      }
      case "team_join": // someone new in the team (rtm users add), or
      case "user_change": // a profile changed: the directory shows them as they are now
        if (!event.user || !event.user.id) return false;
        this.users.set(event.user.id, event.user);
        return true;
      case "member_joined_channel":
      case "member_left_channel": {
        const conv = this.conversations.get(event.channel);
        if (!conv || !conv.members) return false;
        const members = new Set(conv.members);
        if (event.type === "member_joined_channel") members.add(event.user);
        else members.delete(event.user);
        conv.members = [...members];
        return true;
      }
      default:
        return false;
    }
  }

  applyMessage(event, now, visible) {
    const conv = this.conversations.get(event.channel);
    if (event.subtype === "message_changed") {
      const message = event.message || {};
      if (conv) {
        const old = conv.messages.get(message.ts);
        if (old) conv.messages.set(message.ts, { ...old, ...message, reactions: old.reactions });
        conv.latestTs = maxTs(conv.latestTs, event.ts);
      }
      this.inThread(event.channel, message.ts, (messages, old) =>
        messages.set(message.ts, { ...old, ...message, reactions: old.reactions }),
      );
      return true;
    }
    if (event.subtype === "message_deleted") {
      if (conv) {
        conv.messages.delete(event.deleted_ts);
        conv.deleted.add(event.deleted_ts);
        conv.latestTs = maxTs(conv.latestTs, event.ts);
      }
      this.inThread(event.channel, event.deleted_ts, (messages) => messages.delete(event.deleted_ts));
      if (this.thread && this.thread.channel === event.channel && this.thread.ts === event.deleted_ts) {
        this.thread = null;
      }
      return true;
    }
    const message = { ...event };
    delete message.channel;
    delete message.event_ts;
    const typers = this.typing.get(event.channel);
    if (typers) typers.delete(event.user);
    this.settlePending(event.channel, message);
    let fresh = false;
    if (conv) {
      fresh = conv.put(message);
      if (!inTimeline(message)) conv.latestTs = maxTs(conv.latestTs, message.ts);
    }
    if (message.thread_ts && message.thread_ts !== message.ts) {
      const parent = conv && conv.messages.get(message.thread_ts);
      if (parent && !conv.countedReplies.has(message.ts)) {
        conv.countedReplies.add(message.ts); // a reply seen twice (live, then again) counts once
        const users = new Set(parent.reply_users || []);
        users.add(message.user);
        conv.messages.set(parent.ts, {
          ...parent,
          reply_count: (parent.reply_count || 0) + 1,
          reply_users: [...users],
          latest_reply: message.ts,
        });
      }
      if (this.thread && this.thread.channel === event.channel && this.thread.ts === message.thread_ts) {
        this.thread.messages.set(message.ts, message);
      }
    }
    const counts = fresh || !inTimeline(message);
    if (conv && counts && message.user !== this.self.id && (event.channel !== this.openId || !visible)) {
      conv.unread += 1;
      if (conv.isIm || mentions(message.text, this.self.id)) conv.mentions += 1;
    }
    return true;
  }

  threadHas(channel, ts) {
    return Boolean(this.thread && this.thread.channel === channel && this.thread.messages.has(ts));
  }

  inThread(channel, ts, change) {
    if (this.thread && this.thread.channel === channel && this.thread.messages.has(ts)) {
      change(this.thread.messages, this.thread.messages.get(ts));
    }
  }

  applyReaction(event) {
    const item = event.item || {};
    const change = (message) => {
      const reactions = (message.reactions || []).map((r) => ({ ...r, users: [...r.users] }));
      let entry = reactions.find((r) => r.name === event.reaction);
      if (event.type === "reaction_added") {
        if (!entry) reactions.push((entry = { name: event.reaction, users: [], count: 0 }));
        if (!entry.users.includes(event.user)) entry.users.push(event.user);
      } else if (entry) {
        entry.users = entry.users.filter((u) => u !== event.user);
      }
      for (const r of reactions) r.count = r.users.length;
      return { ...message, reactions: reactions.filter((r) => r.count > 0) };
    };
    const conv = this.conversations.get(item.channel);
    const message = conv && conv.messages.get(item.ts);
    if (message) conv.messages.set(item.ts, change(message));
    this.inThread(item.channel, item.ts, (messages, old) => messages.set(item.ts, change(old)));
    if (conv) conv.latestTs = maxTs(conv.latestTs, event.event_ts);
    return Boolean(message) || this.threadHas(item.channel, item.ts);
  }

  /** Who is typing in ``channel`` now (expired entries are dropped). */
  typers(channel, now = Date.now()) {
    const typers = this.typing.get(channel);
    if (!typers) return [];
    for (const [user, until] of typers) if (until <= now) typers.delete(user);
    return [...typers.keys()];
  }

  // -- sending ---------------------------------------------------------------------------------
  addPending(channel, text, threadTs) {
    const id = this.nextLocalId++;
    const entry = { id, channel, thread_ts: threadTs || "", text, state: "pending", error: "", since: Date.now() };
    this.pending.set(id, entry);
    return entry;
  }

  /** The gateway acknowledged (``ok`` with ``ts``) or refused (``error``) a pending message. */
  acknowledge(id, reply) {
    const entry = this.pending.get(id);
    if (!entry) return;
    if (reply.ok) {
      this.pending.delete(id);
      const message = { type: "message", user: this.self.id, text: entry.text, ts: reply.ts, team: this.team.id };
      if (entry.thread_ts) message.thread_ts = entry.thread_ts;
      const conv = this.conversations.get(entry.channel);
      if (conv && !conv.messages.has(reply.ts) && !conv.deleted.has(reply.ts)) conv.put(message);
      if (entry.thread_ts && this.thread && this.thread.ts === entry.thread_ts && !this.thread.messages.has(reply.ts)) {
        this.thread.messages.set(reply.ts, message);
      }
    } else {
      entry.state = "failed";
      entry.error = reply.error;
    }
  }

  /** Our own message arrived (live or in history) before its acknowledgement: the pending copy goes. */
  settlePending(channel, message) {
    if (message.user !== this.self.id) return;
    for (const entry of this.pending.values()) {
      if (
        entry.channel === channel &&
        entry.text === message.text &&
        (entry.thread_ts || "") === (message.thread_ts && message.thread_ts !== message.ts ? message.thread_ts : "")
      ) {
        this.pending.delete(entry.id);
        return;
      }
    }
  }

  pendingIn(channel, threadTs = "") {
    return [...this.pending.values()].filter((e) => e.channel === channel && e.thread_ts === threadTs);
  }

  /** Users whose presence the view shows that we have no word on yet are "unknown" (no dot colour). */
  presenceOf(user) {
    return this.presence.get(user) || "unknown";
  }
}
