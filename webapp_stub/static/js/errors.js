// What a person reads when something goes wrong: one sentence per error code,
// for the Web API's codes, the gateway's refusals and the page's own failures.

const SIGNED_OUT = "Your sign-in has expired or the token is not valid. Sign in again.";

const MESSAGES = {
  invalid_auth: SIGNED_OUT,
  not_authed: SIGNED_OUT,
  token_revoked: SIGNED_OUT,
  token_expired: SIGNED_OUT,
  account_inactive: "This account has been deactivated. Sign in as someone else.",
  not_in_channel: "You're not a member of this channel. Join it to send messages.",
  msg_too_long: "That message is too long: the limit is 40,000 characters. Shorten it and retry.",
  ratelimited: "You're sending too fast. Wait a moment, then retry.",
  rate_limited: "You're sending too fast. Wait a moment, then retry.",
  fleet_unreachable: "Can't reach rtm. Is the fleet running (rtm up)? Retrying…",
  fleet_unavailable: "rtm couldn't deliver that just now. Retry in a moment.",
  service_unavailable: "No gateway is available right now. Retrying…",
  connection_lost: "The connection dropped before rtm confirmed this message; it was not sent.",
  timeout: "rtm did not confirm this message in time; it was not sent.",
  not_connected: "Not connected: the message will not go out until rtm is reachable again.",
  channel_not_found: "That conversation doesn't exist or you can't see it.",
  is_archived: "This channel is archived: nobody can post in it.",
  name_taken: "A channel with that name already exists.",
  invalid_name_specials: "Channel names may contain only lowercase letters, numbers, hyphens and underscores.",
  invalid_name_required: "Give the channel a name.",
  invalid_name_maxlength: "Channel names can be at most 80 characters.",
  cant_leave_general: "Everyone stays in #general: it can't be left.",
  cant_update_message: "You can only edit your own messages.",
  cant_delete_message: "You can only delete your own messages.",
  message_not_found: "That message no longer exists.",
  already_reacted: "You already added that reaction.",
  no_text: "Write something before sending.",
  bad_response: "rtm sent an answer the page couldn't read. Retrying may help.",
  user_not_found: "That person isn't in this team.",
  file_not_found: "That file doesn't exist any more, or you can't see it.",
  file_deleted: "That file was deleted.",
};

// The gateway answers a refused websocket message with {code, msg}: code 5 carries the
// webapp's Slack error code in msg, code 4 is its own rate limit (gateway/client_messages.py).
const GATEWAY_CODES = { 1: "bad_response", 2: "bad_response", 3: "no_text", 4: "ratelimited", 6: "bad_response" };

/** The Slack-style code behind a gateway reply's ``error`` ({code, msg}) or a plain code. */
export function errorCode(error) {
  if (error && typeof error === "object") {
    if (error.code === 5) {
      return /^[a-z_]+$/.test(error.msg || "") ? error.msg : "fleet_unavailable";
    }
    return GATEWAY_CODES[error.code] || String(error.msg || "unknown_error");
  }
  return String(error || "unknown_error");
}

/** One sentence a person understands, for any error code. */
export function describeError(error) {
  const code = errorCode(error);
  return MESSAGES[code] || `Something went wrong (${code}).`;
}

/** Whether the code means the token is no good and the person must sign in again. */
export function isAuthError(code) {
  return ["invalid_auth", "not_authed", "token_revoked", "token_expired", "account_inactive"].includes(code);
}
