// The Web API, as Slack's own client calls it: POST /api/<method>, a JSON body,
// the token as Authorization: Bearer (never in a URL), {"ok": ...} replies,
// HTTP 429 with Retry-After waited out a bounded number of times.

export const MAX_RATELIMIT_RETRIES = 2;
export const MAX_RETRY_AFTER_S = 30;
export const MAX_PAGES = 20; // pages read by callPaged before it stops

export class ApiError extends Error {
  constructor(code, { status = 200, retryAfterS = 0 } = {}) {
    super(code);
    this.code = code;
    this.status = status;
    this.retryAfterS = retryAfterS;
  }
}

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class WebApi {
  /**
   * @param {string} token
   * @param {{base?: string, onRateLimited?: (s: number) => void, onReachable?: (ok: boolean) => void}} options
   */
  constructor(token, { base = "/api/", onRateLimited = () => {}, onReachable = () => {} } = {}) {
    this.token = token;
    this.base = base;
    this.onRateLimited = onRateLimited;
    this.onReachable = onReachable;
  }

  /** One method call; resolves with the reply, rejects with an ApiError (code "fleet_unreachable" when no answer). */
  async call(method, args = {}) {
    for (let attempt = 0; ; attempt++) {
      let response;
      try {
        response = await fetch(this.base + method, {
          method: "POST",
          headers: { Authorization: `Bearer ${this.token}`, "Content-Type": "application/json; charset=utf-8" },
          body: JSON.stringify(args),
          cache: "no-store",
          credentials: "omit",
        });
      } catch {
        this.onReachable(false);
        throw new ApiError("fleet_unreachable", { status: 0 });
      }
      if (response.status === 429) {
        const waitS = Math.min(MAX_RETRY_AFTER_S, Math.max(1, Number(response.headers.get("Retry-After")) || 1));
        this.onRateLimited(waitS);
        if (attempt < MAX_RATELIMIT_RETRIES) {
          await sleep(waitS * 1000);
          continue;
        }
        throw new ApiError("ratelimited", { status: 429, retryAfterS: waitS });
      }
      let body;
      try {
        body = await response.json();
      } catch {
        // a proxy's error page (the webapp is down behind the edge) or a broken reply
        this.onReachable(false);
        throw new ApiError(response.status >= 500 ? "fleet_unreachable" : "bad_response", { status: response.status });
      }
      this.onReachable(true);
      if (!body || body.ok !== true) {
        throw new ApiError(String((body && body.error) || "bad_response"), { status: response.status });
      }
      return body;
    }
  }

  /** Every page of a cursor-paginated method (at most MAX_PAGES), the ``key`` arrays joined. */
  async callPaged(method, key, args = {}) {
    const items = [];
    let cursor = "";
    for (let page = 0; page < MAX_PAGES; page++) {
      const reply = await this.call(method, { ...args, ...(cursor ? { cursor } : {}) });
      items.push(...(reply[key] || []));
      cursor = (reply.response_metadata && reply.response_metadata.next_cursor) || "";
      if (!cursor) break;
    }
    return items;
  }
}
