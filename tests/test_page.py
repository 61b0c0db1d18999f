"""The chat page (GET /) in real headless Chromium against the real server on 127.0.0.1.

Needs Debian's `chromium` (installed by .ci/run) and the `playwright` Python package (test extra); the
browser is never downloaded: Playwright drives /usr/bin/chromium. Skips cleanly when either is absent.
Screenshots go to $DOCTORGLM_TEST_ARTIFACTS (or a tmp dir printed in the report).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CHROMIUM = Path(os.environ.get("DOCTORGLM_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the [test] extra)")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
LAPTOP = {"width": 1280, "height": 800}
TABLET = {"width": 820, "height": 1180}
QUESTION = "孩子发烧三天，咳嗽有痰，怎么办？"
EMERGENCY = "胸口剧痛，出冷汗，左臂发麻"
TIMEOUT_MS = 30_000

# Installed before the page's own script: records every turn's states (with whether the red-flag banner
# was showing at that moment) and polls the newest answer's textContent length every 5 ms.
RECORDER = """
window.__states = [];
window.__lengths = [];
new MutationObserver((records) => {
  for (const r of records) {
    if (r.type === 'attributes' && r.target.classList.contains('turn')) {
      const flag = r.target.querySelector('.redflag');
      window.__states.push({turn: [...document.querySelectorAll('.turn')].indexOf(r.target),
                            state: r.target.dataset.state, flag: !!flag && !flag.hidden});
    }
  }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ['data-state']});
setInterval(() => {
  const texts = document.querySelectorAll('.turn .a-text');
  if (!texts.length) return;
  const n = texts[texts.length - 1].textContent.length;
  if (window.__lengths[window.__lengths.length - 1] !== n) window.__lengths.push(n);
}, 5);
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("DOCTORGLM_TEST_ARTIFACTS")
    path = Path(where) / "page" if where else tmp_path_factory.mktemp("page-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    print(f"page screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    profile = tmp_path_factory.mktemp("chromium-profile")  # a fresh --user-data-dir
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
            viewport=LAPTOP, locale="zh-CN", service_workers="block",
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    """A fresh tab (so a fresh sessionStorage) with the recorder; fails the test on any page error."""
    tab = browser.new_page()
    tab.add_init_script(RECORDER)
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def auth_server(cache_dir: Path, default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.server import start_server

    running = start_server(cache_dir, tmp_path_factory.mktemp("auth-server"), {"DOCTORGLM_API_KEYS": "secret"})
    yield running
    running.stop()


def open_page(tab, url: str, query: str = "") -> None:
    tab.goto(url + "/" + query)
    tab.wait_for_selector("#server-status[data-state='ready']")


def ask(tab, question: str) -> None:
    tab.fill("#question", question)
    tab.press("#question", "Enter")


def wait_state(tab, state: str, turn: int = -1) -> None:
    tab.wait_for_function("([s, i]) => { const t = [...document.querySelectorAll('.turn')].at(i);"
                          " return t && t.dataset.state === s; }", arg=[state, turn], timeout=TIMEOUT_MS)


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                total += sample.value
    return total


def test_answer_grows_with_references_notice_and_history(server, page, artifacts: Path) -> None:
    open_page(page, server.url, "?max_new_tokens=160&min_new_tokens=160&lang=zh")
    page.focus("#question")
    page.keyboard.type("第一行")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("第二行")
    assert page.input_value("#question") == "第一行\n第二行" and page.locator(".turn").count() == 0

    ask(page, QUESTION)
    wait_state(page, "done")
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    assert len(set(lengths)) >= 3, f"the answer should grow over several updates, saw lengths {lengths}"
    assert lengths == sorted(lengths)
    states = [s["state"] for s in page.evaluate("window.__states") if s["turn"] == 0]
    assert states[0] == "queued" and "streaming" in states and states[-1] == "done", states
    first_answer = page.text_content(".turn >> nth=0 >> .a-text")
    assert first_answer and len(first_answer) == lengths[-1]

    refs = page.locator(".turn >> nth=0 >> .refs .ref")
    assert refs.count() >= 1
    assert page.text_content(".turn >> nth=0 >> .ref-name").strip()
    assert page.locator(".turn >> nth=0 >> .ref .chip:not(.badge)").count() >= 1, "sections used should be listed"
    details = refs.first.locator("details")
    assert not details.locator("dd").first.is_visible()
    details.locator("summary").focus()
    page.keyboard.press("Enter")  # expandable by keyboard
    assert details.locator("dd").first.is_visible()
    assert "本回答由人工智能生成" in page.text_content(".turn >> nth=0 >> .notice")
    assert not page.locator(".turn >> nth=0 >> .redflag").is_visible(), "no red flag for an ordinary question"
    assert page.get_attribute(".turn >> nth=0 >> .a-text", "aria-live") == "polite"
    page.screenshot(path=str(artifacts / "answer-laptop.png"))

    with page.expect_request("**/chat/stream") as request:
        ask(page, "需要去医院吗？")
    body = json.loads(request.value.post_data or "{}")
    assert body["history"] == [[QUESTION, first_answer]]
    assert body["max_new_tokens"] == 160 and body["min_new_tokens"] == 160
    wait_state(page, "done", 1)
    assert "2" in page.text_content("#history-count")


def test_stop_aborts_the_stream_and_the_server_stops(server, page, artifacts: Path) -> None:
    open_page(page, server.url, "?max_new_tokens=512&min_new_tokens=512")
    cancelled_before = metric(server.url, "doctorglm_finish_reasons_total", {"reason": "cancelled"})
    ask(page, QUESTION)
    # A function, not an expression string: the page's CSP has no 'unsafe-eval', which a string predicate needs.
    page.wait_for_function("() => document.querySelector('.turn .a-text').textContent.length > 10")
    assert metric(server.url, "doctorglm_active_streams") >= 1
    assert page.is_visible("#stop") and page.is_disabled("#send")
    page.click("#stop")
    wait_state(page, "stopped")
    deadline = time.monotonic() + 10
    while metric(server.url, "doctorglm_active_streams") != 0:
        assert time.monotonic() < deadline, "the server kept generating after Stop"
        time.sleep(0.1)
    assert metric(server.url, "doctorglm_finish_reasons_total", {"reason": "cancelled"}) == cancelled_before + 1
    stopped_at = len(page.text_content(".turn .a-text") or "")
    page.wait_for_timeout(300)
    assert len(page.text_content(".turn .a-text") or "") == stopped_at
    assert page.is_hidden("#stop") and page.is_enabled("#send")
    page.screenshot(path=str(artifacts / "stopped-laptop.png"))


def test_wrong_api_key_shows_the_servers_401_message(auth_server, page, artifacts: Path) -> None:
    open_page(page, auth_server.url, "?max_new_tokens=8&lang=en")
    assert page.is_visible("#api-key-row"), "/readyz says auth is required: the key field must show"
    page.fill("#api-key", "wrong")
    ask(page, "I have a fever and a cough.")
    wait_state(page, "error")
    status = page.text_content(".turn .turn-status")
    assert "401" in status and "missing or wrong API key" in status, status
    assert page.evaluate("sessionStorage.getItem('doctorglm.apiKey')") == "wrong"
    assert page.evaluate("localStorage.getItem('doctorglm.apiKey')") is None
    assert page.evaluate("document.activeElement.id") == "api-key", "after a 401 the key field has the focus"
    page.screenshot(path=str(artifacts / "unauthorized-laptop.png"))

    page.fill("#api-key", "secret")
    ask(page, "I have a fever and a cough.")
    wait_state(page, "done", 1)


def test_emergency_question_shows_red_flag_before_the_answer(server, page, artifacts: Path) -> None:
    open_page(page, server.url, "?max_new_tokens=64&min_new_tokens=64&lang=zh")
    ask(page, EMERGENCY)
    wait_state(page, "done", 0)
    flag = page.locator(".turn >> nth=0 >> .redflag")
    assert flag.is_visible(), "an emergency question must raise the red-flag banner"
    assert "120" in flag.text_content(), "the banner carries the triage advice"
    streaming = [s for s in page.evaluate("window.__states") if s["turn"] == 0 and s["state"] == "streaming"]
    assert streaming and streaming[0]["flag"], "the banner must show before the model's text"
    assert page.evaluate("(() => { const t = document.querySelector('.turn');"
                         " return !!(t.querySelector('.redflag').compareDocumentPosition(t.querySelector('.a-text'))"
                         " & Node.DOCUMENT_POSITION_FOLLOWING); })()")
    page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts / "chat-laptop.png"))
    page.set_viewport_size(TABLET)
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(artifacts / "chat-tablet.png"))
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "no sideways scrolling"

    ask(page, "需要做哪些检查？")  # a follow-up; triage also reads the history, so it may stay flagged
    wait_state(page, "done", 1)
    page.screenshot(path=str(artifacts / "chat-tablet-followup.png"))


def test_model_and_reference_text_is_never_html(server, page) -> None:
    meta = {"id": "chat-x", "request_id": "r", "keywords": ["<b>kw</b>"], "uncertain": False,
            "references": [{"id": "<i>d</i>", "name": "<img src=x onerror=window.__pwned=1>", "score": 1.0,
                            "matched_keywords": ["<script>window.__pwned=1</script>"], "matched_fields": [],
                            "rank": 1, "used_in_prompt": True, "sections": ["<u>s</u>"]}],
            "safety": {"level": "emergency", "rules": [], "advice": "<img src=x onerror=window.__pwned=1>",
                       "notice": "<b>n</b>"}}
    events = [("meta", meta), ("delta", {"text": "<img src=x onerror=window.__pwned=1>"}),
              ("done", {"id": "chat-x", "finish_reason": "stop", "usage": {}, "safety": meta["safety"]})]
    body = "".join(f"event: {n}\r\ndata: {json.dumps(p)}\r\n\r\n" for n, p in events)
    page.route("**/chat/stream", lambda route: route.fulfill(status=200, body=body,
                                                             headers={"content-type": "text/event-stream"}))
    open_page(page, server.url)
    ask(page, "test")
    wait_state(page, "done")
    assert page.locator("#conversation img, #conversation script, #conversation b, #conversation u").count() == 0
    assert "<img src=x" in page.text_content(".turn .a-text")
    assert "<img src=x" in page.text_content(".turn .ref-name")
    assert page.evaluate("window.__pwned") is None


def test_not_ready_server_is_shown_and_polled(server, page) -> None:
    page.route("**/readyz", lambda route: route.fulfill(
        status=503, content_type="application/json",
        body=json.dumps({"error": {"code": "not_ready", "message": "not ready", "request_id": None},
                         "ready": False, "auth": False})))
    page.goto(server.url + "/?lang=en")
    page.wait_for_selector("#server-status[data-state='not-ready']")
    assert page.is_visible("#not-ready") and page.is_disabled("#send")
    page.unroute("**/readyz")
    page.wait_for_selector("#server-status[data-state='ready']", timeout=10_000)
    assert page.is_hidden("#not-ready") and page.is_enabled("#send")
