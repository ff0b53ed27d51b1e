"""The browser client end to end: headless Chromium (Debian's ``chromium``, driven by
Playwright for Python) against the real fleet from ``rtm up``.

Two browser contexts are two people (alice signs in with the demo picker, bob with
a token). What they do goes through the page exactly as a person does it (the
composer, the message actions, the sidebar, dialogs); what the other sees must
arrive live. The page's websocket frames are recorded from Playwright's view of
the socket, which is what the gateway received. Screenshots for docs/browser.md
are taken at the end (desktop 1280 wide, phone 390 wide).

Playwright's own browser download is not used: ``executable_path`` points at the
system's Chromium (``RTM_CHROMIUM``, else ``chromium`` on PATH); ``.ci/run``
installs it. Without it the module is skipped, except under CI (``CI`` set), where
that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from slack_sdk import WebClient

from rtmctl.launcher import rtm_argv
from tests.support import DEFAULT_WAIT_S
from tests.system.harness import Fleet

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

DOCS = Path(__file__).resolve().parents[2] / "docs"
# The screenshots in docs/ are made by test_screenshots_desktop_and_phone; it writes them there
# only when asked (RTM_UPDATE_SCREENSHOTS=1), so an ordinary run leaves the work tree clean.
UPDATE_SCREENSHOTS = os.environ.get("RTM_UPDATE_SCREENSHOTS") == "1"
LIVE_S = 1.0  # the bound: a message sent by one appears for the other within a second
WAIT_MS = DEFAULT_WAIT_S * 1000
expect.set_options(timeout=WAIT_MS)  # every assertion waits as long as the rest of the suite (loaded machines)
POLL_MS = 25
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
TYPING_SHOWN_S = 6.0  # model.js TYPING_SHOWN_MS
MSG = "article.msg[data-ts]"


def chromium_path() -> str | None:
    given = os.environ.get("RTM_CHROMIUM")
    if given:
        return given
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    data_dir: Path = tmp_path_factory.mktemp("browser")
    handle = Fleet.up(data_dir)
    try:
        yield handle
    finally:
        handle.down()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium_path()
    if path is None:
        message = "no system Chromium (apt-get install chromium, or set RTM_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with playwright_api.sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=path, headless=True)
        try:
            yield instance
        finally:
            instance.close()


@dataclass
class Person:
    """One browser context signed in as one seeded user, and what its page sent."""

    name: str
    user_id: str
    token: str
    context: Any
    page: Any
    sent: list[dict[str, Any]] = field(default_factory=list)  # websocket frames the page sent
    urls: list[str] = field(default_factory=list)  # websocket URLs the page opened
    errors: list[str] = field(default_factory=list)  # uncaught exceptions in the page

    @property
    def input(self) -> Any:
        return self.page.locator("#composer-input")

    def message(self, text: str) -> Any:
        return self.page.locator(MSG, has_text=text)

    def presence_subs(self) -> list[list[str]]:
        return [f["ids"] for f in self.sent if f.get("type") == "presence_sub"]

    def displayed_presence_users(self) -> list[str]:
        return list(
            self.page.evaluate(
                """() => [...new Set([...document.querySelectorAll('[data-presence-user]')]
                    .filter((e) => e.checkVisibility()).map((e) => e.dataset.presenceUser))].sort()"""
            )
        )

    def pump_until(self, predicate: Callable[[], Any], what: str, timeout_s: float = DEFAULT_WAIT_S) -> Any:
        """Wait for ``predicate`` while Playwright delivers the page's events (its
        handlers run only inside Playwright calls, so a bare sleep would see nothing)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
            self.page.wait_for_timeout(POLL_MS)

    def open_channel(self, name: str) -> None:
        self.page.locator("nav").get_by_role("button", name=f"#{name}").first.click()
        expect(self.page.locator("#conv-title")).to_have_text(f"#{name}")


def sign_in(
    browser: Any, fleet: Fleet, name: str, *, via: str = "picker", viewport: dict[str, int] = DESKTOP
) -> Person:
    user = fleet.user(name)
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    person = Person(name, user["id"], user["token"], context, page)
    page.on("pageerror", lambda exc: person.errors.append(str(exc)))

    def on_socket(ws: Any) -> None:
        person.urls.append(ws.url)
        ws.on("framesent", lambda payload: person.sent.append(json.loads(payload)))

    page.on("websocket", on_socket)
    page.goto(fleet.info["webapp_url"] + "/")
    if via == "picker":
        page.get_by_role("button", name=f"Sign in as {name}").click()
    else:
        page.get_by_label("Or sign in with a token").fill(user["token"])
        page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.locator(".status[data-state=connected]")).to_be_visible(timeout=WAIT_MS)
    assert user["token"] not in page.url
    return person


def api(fleet: Fleet, method: str, token: str, **params: Any) -> dict[str, Any]:
    request = urllib.request.Request(
        fleet.api_url + method,
        data=urllib.parse.urlencode(params).encode(),
        headers={"Authorization": f"Bearer {token}"},
    )
    with urllib.request.urlopen(request, timeout=DEFAULT_WAIT_S) as resp:
        reply = json.load(resp)
    assert reply["ok"], reply
    return dict(reply)


@pytest.fixture(scope="module")
def alice(browser: Any, fleet: Fleet) -> Iterator[Person]:
    person = sign_in(browser, fleet, "alice")
    yield person
    assert not person.errors, person.errors
    person.context.close()


@pytest.fixture(scope="module")
def bob(browser: Any, fleet: Fleet) -> Iterator[Person]:
    person = sign_in(browser, fleet, "bob", via="token")
    yield person
    assert not person.errors, person.errors
    person.context.close()


# -- the page's own modules ------------------------------------------------------------------------


def test_model_backoff_and_error_words_in_the_browser(alice: Person) -> None:
    """The pure modules, run by Chromium itself: ts order, dedupe by ts, no revival of a
    deleted message, unread and mention counts, backoff bounds, error words."""
    result = alice.page.evaluate(
        """async () => {
        const m = await import('/client/js/model.js');
        const r = await import('/client/js/rtm.js');
        const e = await import('/client/js/errors.js');
        const ws = new m.Workspace({id: 'U1', name: 'me'}, {id: 'T1', name: 't'});
        ws.conversation({id: 'C1', name: 'one', is_member: true});
        ws.conversation({id: 'C2', name: 'two', is_member: true});
        ws.setOpen('C1');
        const msg = (ts, user, text) => ({type: 'message', channel: 'C2', user, text, ts});
        ws.apply(msg('1700000000.000100', 'U2', 'a'));
        ws.apply(msg('1700000000.000100', 'U2', 'a'));          // the same event twice
        ws.apply(msg('1700000000.000200', 'U2', 'hi <@U1>'));   // a mention
        ws.apply(msg('1700000000.000300', 'U1', 'mine'));       // own: not unread
        const c2 = ws.conversations.get('C2');
        const counts = [c2.messages.size, c2.unread, c2.mentions];
        ws.apply({type: 'message', subtype: 'message_deleted', channel: 'C2', ts: '1700000000.000400',
                  deleted_ts: '1700000000.000100'});
        // a history page read before the deletion, answered after it: 100 must stay gone
        c2.reconcile([{type: 'message', user: 'U1', text: 'mine', ts: '1700000000.000300'},
                      {type: 'message', user: 'U2', text: 'hi <@U1>', ts: '1700000000.000200'},
                      {type: 'message', user: 'U2', text: 'a', ts: '1700000000.000100'},
                      {type: 'message', user: 'U2', text: 'b', ts: '1700000000.000050'}], '');
        const pending = ws.addPending('C1', 'hello', '');
        ws.apply({type: 'message', channel: 'C1', user: 'U1', text: 'hello', ts: '1700000001.000000'});
        ws.acknowledge(pending.id, {ok: true, ts: '1700000001.000000'});
        // read in another tab: channel_marked at C2's newest message clears its counts here
        const c2Before = [c2.unread, c2.mentions];
        ws.apply({type: 'channel_marked', channel: 'C2', ts: '1700000000.000050'});   // older: counts stay
        const c2Older = [c2.unread, c2.mentions];
        ws.apply({type: 'channel_marked', channel: 'C2', ts: c2.latestTs});
        const marked = [c2Before, c2Older, [c2.unread, c2.mentions], c2.markedTs === c2.latestTs];
        const before = ws.userName('U9');
        const joined = [ws.apply({type: 'team_join', user: {id: 'U9', name: 'frank', real_name: 'Frank'}}),
                        ws.apply({type: 'user_change', user: {id: 'U9', name: 'frankie', real_name: 'F'}})];
        return {
            team: [before, ...joined, ws.userName('U9')],
            marked,
            order: [m.compareTs('1700000000.000100', '1700000000.0001'),
                    m.compareTs('999999999.900000', '1700000000.000000') < 0,
                    m.compareTs('1700000000.000200', '1700000000.000100') > 0],
            counts,
            afterDelete: [...c2.messages.keys()].sort(),
            c1: [...ws.conversations.get('C1').messages.keys()],
            pending: ws.pending.size,
            backoff: [r.backoffDelayMs(0, () => 0), r.backoffDelayMs(0, () => 1),
                      r.backoffDelayMs(3, () => 1), r.backoffDelayMs(40, () => 0), r.backoffDelayMs(40, () => 1)],
            words: [e.errorCode({code: 5, msg: 'msg_too_long'}), e.errorCode({code: 4, msg: 'rate limited'}),
                    e.describeError('invalid_auth'), e.describeError({code: 5, msg: 'not_in_channel'}),
                    e.describeError('ratelimited'), e.describeError('fleet_unreachable'),
                    e.describeError('something_new')],
        };
    }"""
    )
    assert result["marked"] == [[2, 1], [2, 1], [0, 0], True]  # channel_marked from another tab
    assert result["team"] == ["U9", True, True, "frankie"]  # team_join, then user_change, in the directory
    assert result["order"] == [0, True, True]
    assert result["counts"] == [3, 2, 1]  # two from U2 unread, one of them a mention
    assert result["afterDelete"] == ["1700000000.000050", "1700000000.000200", "1700000000.000300"]
    assert result["c1"] == ["1700000001.000000"] and result["pending"] == 0
    assert result["backoff"] == [250, 500, 4000, 15000, 30000]
    code_too_long, code_limited, expired, not_in, limited, unreachable, unknown = result["words"]
    assert (code_too_long, code_limited) == ("msg_too_long", "ratelimited")
    assert "Sign in again" in expired and "not a member" in not_in and "too fast" in limited
    assert "Can't reach rtm" in unreachable and "something_new" in unknown


# -- messages ----------------------------------------------------------------------------------------


def test_a_message_sent_by_one_appears_for_the_other_within_a_second(fleet: Fleet, alice: Person, bob: Person) -> None:
    text = unique("hello bob")
    alice.input.fill(text)
    started = time.monotonic()
    alice.input.press("Enter")
    bob.message(text).wait_for(timeout=LIVE_S * 1000)
    elapsed = time.monotonic() - started
    assert elapsed < LIVE_S, elapsed
    # sent over the websocket with an id, acknowledged (the pending copy is gone), shown once
    frame = next(f for f in alice.sent if f.get("type") == "message" and f.get("text") == text)
    assert isinstance(frame["id"], int) and frame["channel"] == fleet.channel("general")
    expect(alice.message(text)).to_have_count(1)
    expect(alice.page.locator("article.msg[data-state]")).to_have_count(0)
    expect(bob.message(text)).to_have_count(1)
    history = api(fleet, "conversations.history", bob.token, channel=fleet.channel("general"), limit=20)
    assert [m["text"] for m in history["messages"]].count(text) == 1


def test_edit_deletion_and_reaction_appear_live(fleet: Fleet, alice: Person, bob: Person) -> None:
    text, edited = unique("typo"), unique("fixed")
    ts = api(fleet, "chat.postMessage", alice.token, channel=fleet.channel("general"), text=text)["ts"]
    mine, theirs = (p.page.locator(f'{MSG}[data-ts="{ts}"]') for p in (alice, bob))
    expect(theirs).to_contain_text(text)

    mine.hover()
    mine.get_by_role("button", name="Edit message").click()
    box = mine.get_by_role("textbox", name="Edit message")
    box.fill(edited)
    box.press("Enter")
    expect(theirs).to_contain_text(edited)
    expect(theirs.locator(".edited")).to_have_text("(edited)")

    theirs.hover()
    theirs.get_by_role("button", name="Add reaction").click()
    theirs.get_by_role("button", name="React with thumbsup").click()
    expect(mine.locator('.reaction[data-reaction="thumbsup"]')).to_have_text("👍 1")
    expect(theirs.locator('.reaction[data-reaction="thumbsup"]')).to_have_attribute("aria-pressed", "true")

    alice.page.once("dialog", lambda dialog: dialog.accept())
    mine.hover()
    mine.get_by_role("button", name="Delete message").click()
    expect(theirs).to_have_count(0)
    expect(mine).to_have_count(0)


def test_a_shared_file_shows_as_a_link_that_downloads_with_the_token(fleet: Fleet, alice: Person, bob: Person) -> None:
    """files_upload_v2 by alice: bob's page shows the file under the message, a click fetches it with
    his token (never in a URL) and saves it; deleted, it says so."""
    bob.open_channel("general")
    data = unique("file body").encode() * 100
    client = WebClient(token=alice.token, base_url=fleet.api_url)
    shared = client.files_upload_v2(
        channel=fleet.channel("general"), content=data, filename="notes.txt", initial_comment=unique("see file")
    )["file"]
    link = bob.page.locator(f'{MSG} .file[data-file="{shared["id"]}"]')
    expect(link).to_contain_text("notes.txt")
    with bob.page.expect_download() as waiting:
        link.click()
    download = waiting.value
    assert download.suggested_filename == "notes.txt"
    assert Path(download.path()).read_bytes() == data
    client.files_delete(file=shared["id"])
    gone = bob.page.locator(f"{MSG}", has=bob.page.locator(".file.gone"))
    expect(gone.last).to_contain_text("This file was deleted.")
    expect(link).to_have_count(0)


def test_typing_indicator_appears_and_clears_both_ways(alice: Person, bob: Person) -> None:
    typing_of = {p.name: p.page.locator(".typing") for p in (alice, bob)}
    bob.input.press_sequentially("hel")
    expect(typing_of["alice"]).to_have_text("bob is typing…")
    bob.input.press_sequentially("lo")
    bob.input.press("Enter")
    expect(typing_of["alice"]).to_have_text("")  # the message ends it

    alice.input.press_sequentially("thinking")
    expect(typing_of["bob"]).to_have_text("alice is typing…")
    alice.input.fill("")
    started = time.monotonic()
    expect(typing_of["bob"]).to_have_text("", timeout=(TYPING_SHOWN_S + 3) * 1000)  # it expires
    assert time.monotonic() - started > 1.0
    frames = [f for f in bob.sent if f.get("type") == "typing"]
    assert frames and all(set(f) == {"id", "type", "channel"} for f in frames)


def test_a_refused_message_shows_its_error_and_a_retry(alice: Person) -> None:
    alice.input.fill("x" * 40_001)  # over Slack's 40,000 characters: the webapp refuses msg_too_long
    alice.input.press("Enter")
    failed = alice.page.locator('article.msg[data-state="failed"]')
    expect(failed).to_contain_text("too long")
    expect(failed.get_by_role("button", name="Retry")).to_be_visible()
    failed.get_by_role("button", name="Discard").click()
    expect(failed).to_have_count(0)


# -- presence -----------------------------------------------------------------------------------------


def test_presence_only_for_the_users_shown_and_away_when_their_page_closes(
    browser: Any, fleet: Fleet, alice: Person
) -> None:
    carol = sign_in(browser, fleet, "carol")
    dave = fleet.user("dave")["id"]
    text = unique("carol here")
    carol.input.fill(text)
    carol.input.press("Enter")
    dot = alice.message(text).locator(".dot")
    expect(dot).to_have_attribute("data-presence", "active")

    def subscribed_to_what_is_shown() -> bool:
        subs = alice.presence_subs()
        return bool(subs) and subs[-1] == alice.displayed_presence_users()

    alice.pump_until(subscribed_to_what_is_shown, "alice's presence_sub to equal the users on screen")
    shown = alice.presence_subs()[-1]
    assert carol.user_id in shown and alice.user_id in shown and dave not in shown

    # the set follows the view: the member list shows everyone in #general, then goes away
    alice.page.get_by_role("button", name="Show members").click()
    expect(alice.page.get_by_role("complementary", name="Members")).to_contain_text("dave")
    alice.pump_until(lambda: dave in alice.presence_subs()[-1], "dave in the presence_sub")
    alice.pump_until(subscribed_to_what_is_shown, "presence_sub == users on screen, member list open")
    alice.page.get_by_role("button", name="Close members").click()
    alice.pump_until(lambda: dave not in alice.presence_subs()[-1], "dave out of the presence_sub")
    assert subscribed_to_what_is_shown()

    assert not carol.errors, carol.errors
    carol.context.close()  # carol's only connection goes: the gateway reports her offline
    expect(dot).to_have_attribute("data-presence", "away", timeout=WAIT_MS)


# -- conversations --------------------------------------------------------------------------------


def test_unread_and_mention_counts_threads_and_direct_messages(fleet: Fleet, alice: Person, bob: Person) -> None:
    random = fleet.channel("random")
    api(fleet, "chat.postMessage", bob.token, channel=random, text=f"<@{alice.user_id}> look at this")
    api(fleet, "chat.postMessage", bob.token, channel=random, text="and this")
    channel_button = alice.page.locator(f'nav button[data-conversation="{random}"]')
    expect(channel_button.locator(".badge")).to_have_text("1")  # one mention (of two unread)
    expect(channel_button).to_have_attribute("aria-label", "#random, 1 mentions")
    channel_button.click()
    expect(channel_button.locator(".badge")).to_have_count(0)
    expect(alice.message("and this")).to_be_visible()
    mention = alice.message("look at this").locator(".mention.me")
    expect(mention).to_have_text("@alice")

    # a thread: bob replies to alice's message; alice reads and answers in the thread panel
    root = unique("thread root")
    ts = api(fleet, "chat.postMessage", alice.token, channel=random, text=root)["ts"]
    reply = unique("bob's reply")
    api(fleet, "chat.postMessage", bob.token, channel=random, text=reply, thread_ts=ts)
    alice.message(root).get_by_role("button", name="1 reply").click()
    panel = alice.page.get_by_role("complementary", name="Thread")
    expect(panel.locator(MSG, has_text=reply)).to_be_visible()
    expect(alice.message(reply)).to_have_count(1)  # only in the panel, not in the channel
    answer = unique("alice answers")
    thread_input = panel.get_by_role("textbox", name="Reply in thread")
    thread_input.fill(answer)
    thread_input.press("Enter")
    expect(panel.locator(MSG, has_text=answer)).to_be_visible()
    replies = api(fleet, "conversations.replies", bob.token, channel=random, ts=ts)["messages"]
    assert [m["text"] for m in replies] == [root, reply, answer]
    expect(alice.message(root).get_by_role("button", name="2 replies")).to_be_visible()
    alice.page.keyboard.press("Escape")
    expect(panel).to_be_hidden()

    # a direct message: opened from the people list; for bob it is a mention (a DM always is)
    alice.page.get_by_role("button", name="New direct message").click()
    alice.page.get_by_role("button", name="Message bob").click()
    expect(alice.page.locator("#conv-title")).to_have_text("bob")
    dm_text = unique("psst")
    alice.input.fill(dm_text)
    alice.input.press("Enter")
    dm = alice.page.locator("#conv-title")  # noqa: F841 - the DM is open on alice's side
    bob_dm = bob.page.locator("nav").get_by_role("button", name="alice, 1 mentions")
    expect(bob_dm).to_be_visible()
    bob_dm.click()
    expect(bob.message(dm_text)).to_be_visible()
    alice.open_channel("general")
    bob.open_channel("general")


def test_unread_counts_survive_a_reload_and_reading_marks_them(browser: Any, fleet: Fleet, alice: Person) -> None:
    """The page marks the open conversation read (conversations.mark) and a boot counts from each
    conversation's read mark (conversations.info's last_read): a reload keeps what is unread."""
    name = unique("reads")
    channel = api(fleet, "conversations.create", alice.token, name=name)["channel"]["id"]
    carol = fleet.user("carol")
    api(fleet, "conversations.invite", alice.token, channel=channel, users=carol["id"])
    reader = sign_in(browser, fleet, "carol")  # a tab of its own: the module's pages stay as they are
    try:
        page = reader.page
        reader.open_channel(name)
        seen = api(fleet, "chat.postMessage", alice.token, channel=channel, text=f"{name} seen")["ts"]
        expect(reader.message(f"{name} seen")).to_be_visible()

        def marked() -> str:
            return str(api(fleet, "conversations.info", carol["token"], channel=channel)["channel"]["last_read"])

        reader.pump_until(lambda: marked() == seen, "the open conversation marked read up to its newest message")
        reader.open_channel("general")
        for i in range(2):
            api(fleet, "chat.postMessage", alice.token, channel=channel, text=f"{name} unseen {i}")
        button = page.locator(f'nav button[data-conversation="{channel}"]')
        expect(button.locator(".unread-count")).to_have_text("2")
        page.reload()
        expect(page.locator(".status[data-state=connected]")).to_be_visible()
        expect(button.locator(".unread-count")).to_have_text("2")  # counted again from the read mark
        assert marked() == seen  # looking at another conversation marked nothing here
        button.click()
        expect(button.locator(".unread-count")).to_have_count(0)
        reader.pump_until(lambda: marked() != seen, "the conversation marked read once opened")
        page.reload()
        expect(page.locator(".status[data-state=connected]")).to_be_visible()
        expect(page.locator("#conv-title")).to_have_text(f"#{name}")
        reader.open_channel("general")
        expect(button.locator(".unread-count")).to_have_count(0)
        assert not reader.errors, reader.errors
    finally:
        reader.context.close()


def test_create_leave_join_and_scroll_back_through_history(fleet: Fleet, alice: Person, bob: Person) -> None:
    page = alice.page
    name = unique("made-here")
    page.get_by_role("button", name="Create a channel").click()
    page.get_by_label("Name").fill(name)
    page.get_by_role("button", name="Create", exact=True).click()
    expect(page.locator("#conv-title")).to_have_text(f"#{name}")
    channel = page.evaluate("() => window.rtmApp.ws.openId")
    count = 70  # more than one page (50)
    for i in range(count):
        api(fleet, "chat.postMessage", alice.token, channel=channel, text=f"{name} m-{i:03d}")
    expect(alice.message(f"{name} m-{count - 1:03d}")).to_be_visible()

    # bob finds it by browsing, joins, and reads back to the first message by scrolling up
    bob.page.get_by_role("button", name="Browse channels").click()
    bob.page.get_by_role("button", name=f"Join #{name}").click()
    expect(bob.page.locator("#conv-title")).to_have_text(f"#{name}")
    expect(bob.message(f"{name} m-{count - 1:03d}")).to_be_visible()
    expect(bob.message(f"{name} m-000")).to_have_count(0)  # not read yet: one page only
    for _ in range(10):  # bounded: each scroll reads at most one older page
        if bob.message(f"{name} m-000").count():
            break
        bob.page.locator(".main .messages").evaluate("(box) => { box.scrollTop = 0; }")
        bob.page.wait_for_timeout(200)
    expect(bob.message(f"{name} m-000")).to_be_visible()
    expect(bob.page.locator(".main .messages .older")).to_have_text(f"This is the very beginning of #{name}.")
    expect(bob.page.locator(MSG, has_text=f"{name} m-")).to_have_count(count)  # each exactly once

    # alice leaves: the channel goes from her sidebar and she is back in #general
    page.get_by_role("button", name="Leave channel").click()
    expect(page.locator("#conv-title")).to_have_text("#general")
    expect(page.locator("nav").get_by_role("button", name=f"#{name}")).to_have_count(0)
    members = api(fleet, "conversations.members", bob.token, channel=channel)["members"]
    assert alice.user_id not in members and bob.user_id in members
    bob.open_channel("general")


def test_a_permalink_opens_its_message_far_back_and_a_replys_thread(browser: Any, fleet: Fleet, alice: Person) -> None:
    name = unique("linked")
    channel = api(fleet, "conversations.create", alice.token, name=name)["channel"]["id"]
    posted = [
        api(fleet, "chat.postMessage", alice.token, channel=channel, text=f"{name} m-{i:03d}")["ts"] for i in range(70)
    ]
    reply = api(fleet, "chat.postMessage", alice.token, channel=channel, text=f"{name} reply", thread_ts=posted[5])
    reader = sign_in(browser, fleet, "alice")  # a tab of its own: the module's pages stay as they are
    try:
        page = reader.page
        # m-003 is past the first page (50): the page reads back until it finds it
        page.goto(api(fleet, "chat.getPermalink", alice.token, channel=channel, message_ts=posted[3])["permalink"])
        expect(page.locator("#conv-title")).to_have_text(f"#{name}")
        linked = page.locator(".main article.msg.linked")
        expect(linked).to_contain_text(f"{name} m-003")
        expect(linked).to_be_in_viewport()
        assert urllib.parse.urlsplit(page.url).path == "/"  # a reload opens the page as usual
        # a reply's link opens its thread, the reply shown
        link = api(fleet, "chat.getPermalink", alice.token, channel=channel, message_ts=reply["ts"])["permalink"]
        assert f"thread_ts={posted[5]}" in link
        page.goto(link)
        expect(page.get_by_role("complementary", name="Thread").locator("article.msg.linked")).to_contain_text(
            f"{name} reply"
        )
        # a link to a conversation one is not in opens the page with a word, not a blank
        bobs = api(fleet, "conversations.create", fleet.user("bob")["token"], name=unique("bobs"), is_private="true")
        page.goto(f"{fleet.info['webapp_url']}/archives/{bobs['channel']['id']}/p{posted[0].replace('.', '')}")
        expect(page.get_by_role("alert")).to_contain_text("a conversation you are not in")
        expect(page.locator("#conv-title")).to_have_text(f"#{name}")  # where the tab was
        assert not reader.errors, reader.errors
    finally:
        reader.context.close()


def test_search_lists_matches_and_opens_each_at_its_message(browser: Any, fleet: Fleet, alice: Person) -> None:
    word = unique("found").replace("-", "")
    channel = api(fleet, "conversations.create", alice.token, name=unique("searched"))["channel"]
    for i in range(60):  # the match is past the first page: opening it reads back, as a permalink does
        api(
            fleet,
            "chat.postMessage",
            alice.token,
            channel=channel["id"],
            text=f"{word} m-{i:03d}" if i == 2 else f"m-{i}",
        )
    elsewhere = api(fleet, "conversations.create", fleet.user("bob")["token"], name=unique("notmine"))["channel"]
    api(fleet, "chat.postMessage", fleet.user("bob")["token"], channel=elsewhere["id"], text=f"{word} from bob")
    reader = sign_in(browser, fleet, "alice")  # a tab of its own: the module's pages stay as they are
    try:
        page = reader.page
        page.get_by_role("searchbox", name="Search messages").fill(word)
        page.get_by_role("searchbox", name="Search messages").press("Enter")
        results = page.get_by_role("list", name="Search results")
        expect(results.get_by_role("button")).to_have_count(2)
        expect(results.locator("mark").first).to_have_text(word)  # highlighted, as text: no HTML
        results.get_by_role("button", name=f"{word} m-002").click()
        expect(page.locator("#conv-title")).to_have_text(f"#{channel['name']}")
        linked = page.locator(".main article.msg.linked")
        expect(linked).to_contain_text(f"{word} m-002")
        expect(linked).to_be_in_viewport()
        # a public channel she is not in opens as a preview
        page.get_by_role("searchbox", name="Search messages").press("Enter")
        results.get_by_role("button", name=f"{word} from bob").click()
        expect(page.locator("#conv-title")).to_have_text(f"#{elsewhere['name']}")
        expect(reader.message(f"{word} from bob")).to_be_visible()
        assert not reader.errors, reader.errors
    finally:
        reader.context.close()


# -- failures -----------------------------------------------------------------------------------------


def test_a_killed_gateway_makes_the_page_reconnect_and_catch_up_exactly_once(
    fleet: Fleet, alice: Person, bob: Person
) -> None:
    general = fleet.channel("general")
    port = urllib.parse.urlparse(alice.urls[-1]).port
    gateway = next(p for p in fleet.processes("gateway") if p["port"] == port)
    sockets_before = len(alice.urls)
    subprocess.run(
        rtm_argv("kill", "gateway", gateway["id"], "--data-dir", str(fleet.data_dir)),
        check=True,
        capture_output=True,
        timeout=DEFAULT_WAIT_S,
    )
    expect(alice.page.locator(".status[data-state=reconnecting]")).to_have_text("reconnecting…")
    expect(alice.page.locator(".banner")).to_contain_text("reconnecting…")
    meanwhile = [unique(f"while away {i}") for i in range(3)]
    for text in meanwhile:
        api(fleet, "chat.postMessage", bob.token, channel=general, text=text)
    expect(alice.page.locator(".status[data-state=connected]")).to_be_visible(timeout=WAIT_MS * 2)
    assert len(alice.urls) > sockets_before
    for text in meanwhile:
        expect(alice.message(text)).to_have_count(1)
    # and live again: a message after the reconnect arrives, and nothing doubled meanwhile
    after = unique("back again")
    api(fleet, "chat.postMessage", bob.token, channel=general, text=after)
    expect(alice.message(after)).to_have_count(1)
    texts = alice.page.locator(MSG + " .msg-text").all_text_contents()
    tail = [t for t in texts if t in (*meanwhile, after)]
    assert tail == [*meanwhile, after]


def test_expired_token_and_unreachable_fleet_are_said_in_words(browser: Any, fleet: Fleet) -> None:
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    base = fleet.info["webapp_url"] + "/"
    page.goto(base)
    page.evaluate("() => sessionStorage.setItem('rtm.token', 'xoxp-expired-or-revoked')")
    page.reload()
    expect(page.get_by_role("alert")).to_contain_text("Your sign-in has expired or the token is not valid")
    expect(page.get_by_label("Or sign in with a token")).to_be_visible()
    assert page.evaluate("() => sessionStorage.getItem('rtm.token')") is None
    assert page.url == base

    # the fleet unreachable: every Web API call fails at the network; the page says so and retries
    page.get_by_label("Or sign in with a token").fill(fleet.user("eve")["token"])
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.locator(".status[data-state=connected]")).to_be_visible(timeout=WAIT_MS)
    page.route("**/api/**", lambda route: route.abort())
    page.reload()
    expect(page.get_by_role("alert")).to_contain_text("Can't reach rtm")
    page.unroute("**/api/**")
    expect(page.locator(".status[data-state=connected]")).to_be_visible(timeout=WAIT_MS)
    assert not errors, errors
    context.close()


# -- screenshots for docs/browser.md ------------------------------------------------------------------


def test_screenshots_desktop_and_phone(browser: Any, fleet: Fleet, alice: Person, bob: Person, tmp_path: Path) -> None:
    shots = DOCS if UPDATE_SCREENSHOTS else tmp_path
    general = fleet.channel("general")
    ts = api(fleet, "chat.postMessage", bob.token, channel=general, text=f"<@{alice.user_id}> the fleet is up 🎉")["ts"]
    api(fleet, "reactions.add", alice.token, channel=general, timestamp=ts, name="tada")
    api(fleet, "chat.postMessage", alice.token, channel=general, text="replying in a thread", thread_ts=ts)
    expect(alice.page.locator(f'{MSG}[data-ts="{ts}"] .reaction')).to_have_text("🎉 1")
    alice.page.locator(f'{MSG}[data-ts="{ts}"]').get_by_role("button", name="1 reply").click()
    expect(alice.page.get_by_role("complementary", name="Thread")).to_contain_text("replying in a thread")
    bob.input.press_sequentially("typing")
    expect(alice.page.locator(".typing")).to_have_text("bob is typing…")
    alice.page.screenshot(path=str(shots / "browser-desktop.png"))
    alice.page.keyboard.press("Escape")
    bob.input.fill("")

    phone = sign_in(browser, fleet, "dave", viewport=PHONE)
    expect(phone.message("the fleet is up")).to_be_visible()
    # on a phone the sidebar is a drawer: its dots are not on screen, so not subscribed
    assert fleet.user("bob")["id"] in phone.displayed_presence_users()
    phone.page.screenshot(path=str(shots / "browser-phone.png"))
    phone.page.get_by_role("button", name="Show conversations").click()
    expect(phone.page.locator("nav")).to_be_visible()
    phone.page.screenshot(path=str(shots / "browser-phone-sidebar.png"))
    for name in ("browser-desktop.png", "browser-phone.png", "browser-phone-sidebar.png"):
        assert (shots / name).stat().st_size > 10_000, name  # a real picture, not a blank page
    assert not phone.errors, phone.errors
    phone.context.close()
