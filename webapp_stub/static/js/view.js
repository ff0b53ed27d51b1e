// DOM helpers: building elements (text always as text nodes, never as HTML),
// keyed lists updated in place, and Slack's message markup.

export const EMOJI = {
  thumbsup: "👍",
  "+1": "👍",
  heart: "❤️",
  joy: "😂",
  eyes: "👀",
  tada: "🎉",
  white_check_mark: "✅",
  smile: "😄",
  rocket: "🚀",
};
export const PICKER_REACTIONS = ["thumbsup", "heart", "joy", "eyes", "tada", "white_check_mark"];

/** ``h("button", {class: "x", onclick: fn, "aria-label": "Close"}, "×")`` */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "text") el.textContent = value;
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/**
 * Make ``container``'s children the elements for ``items``, in order, reusing the
 * element of each key: ``create(item)`` builds one, ``sign(item)`` says when its
 * content must be rebuilt with ``fill(el, item)``.
 */
export function reconcile(container, items, { key, create, sign, fill }) {
  const old = new Map();
  for (const el of container.children) old.set(el.dataset.key, el);
  const wanted = items.map((item) => {
    const k = String(key(item));
    let el = old.get(k);
    const signature = sign(item);
    if (!el) {
      el = create(item);
      el.dataset.key = k;
      el._sig = undefined;
    }
    if (el._sig !== signature) {
      fill(el, item);
      el._sig = signature;
    }
    old.delete(k);
    return el;
  });
  for (const el of old.values()) el.remove();
  wanted.forEach((el, i) => {
    if (container.children[i] !== el) container.insertBefore(el, container.children[i] || null);
  });
}

export function emoji(name) {
  return EMOJI[name] || `:${name}:`;
}

export function formatTime(ts) {
  const date = new Date(Number(String(ts).split(".")[0]) * 1000);
  return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

const MARKUP = /<([@#!]?)([^>|]+)(?:\|([^>]*))?>/g;

/** Slack's message markup as nodes: <@U…> mentions, <#C…|name> channels, <http…|label> links. */
export function formatText(text, { userName, channelName, selfId }) {
  const nodes = [];
  let last = 0;
  for (const match of String(text || "").matchAll(MARKUP)) {
    if (match.index > last) nodes.push(document.createTextNode(text.slice(last, match.index)));
    last = match.index + match[0].length;
    const [, sigil, target, label] = match;
    if (sigil === "@") {
      nodes.push(h("span", { class: target === selfId ? "mention me" : "mention" }, "@" + (label || userName(target))));
    } else if (sigil === "#") {
      nodes.push(h("span", { class: "mention" }, "#" + (label || channelName(target))));
    } else if (sigil === "!") {
      nodes.push(h("span", { class: "mention me" }, "@" + (label || target.split("^")[0])));
    } else if (/^https?:\/\//i.test(target)) {
      nodes.push(h("a", { href: target, target: "_blank", rel: "noopener noreferrer" }, label || target));
    } else {
      nodes.push(document.createTextNode(match[0]));
    }
  }
  if (last < String(text || "").length) nodes.push(document.createTextNode(text.slice(last)));
  return nodes;
}

/** The dot that shows a user's presence; the page subscribes to exactly the users whose dots are shown. */
export function presenceDot(userId, presence, name) {
  const label = presence === "active" ? "active" : presence === "away" ? "away" : "presence unknown";
  return h("span", {
    class: "dot",
    dataset: { presenceUser: userId, presence },
    role: "img",
    "aria-label": `${name}: ${label}`,
    title: `${name}: ${label}`,
  });
}

/** The element's rendered and displayed (not in a hidden panel or a closed drawer). */
export function displayed(el) {
  return typeof el.checkVisibility === "function" ? el.checkVisibility() : el.offsetParent !== null;
}

/** ``text`` with search.messages' highlight markers (``\ue000``…``\ue001``) as ``<mark>``
 * elements: the rest stays text nodes, and a stray marker is dropped. */
export function highlighted(text) {
  const parts = [];
  let last = 0;
  for (const found of String(text).matchAll(/\ue000([^\ue000\ue001]*)\ue001/g)) {
    parts.push(text.slice(last, found.index).replace(/[\ue000\ue001]/g, ""), h("mark", {}, found[1]));
    last = found.index + found[0].length;
  }
  parts.push(String(text).slice(last).replace(/[\ue000\ue001]/g, ""));
  return parts.filter((part) => part !== "");
}
