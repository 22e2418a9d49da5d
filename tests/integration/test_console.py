"""The web console in a real browser: Debian's chromium, driven by Playwright, against a real `ragloom up`
(every service, the gateway with mutual TLS and bearer tokens, on free loopback ports) with the bundled
samples ingested by `ragloom ingest --sample`.

Screenshots and the page's load timings are saved under $RAGLOOM_ARTIFACTS (default: .artifacts/console
in the checkout, which git ignores)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from mesh import policy
from mesh.spec import FIXED_PORTS
from tests.support.ports import free_port_block

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(os.environ.get("RAGLOOM_ARTIFACTS", ROOT / ".artifacts")) / "console"
ANSWER_TIMEOUT_MS = 180_000

playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (scripts/bootstrap test installs Debian's where it can)", allow_module_level=True)


@dataclass
class Up:
    url: str
    address: str
    token: str
    data_dir: Path


@contextlib.contextmanager
def ragloom_up(data: Path, **environ: str):
    """`ragloom up` itself, as a user runs it (2 shards, the gateway, mTLS, auth), with the samples ingested."""
    port = free_port_block(2 * 1 + FIXED_PORTS + 1)
    address = f"127.0.0.1:{port}"
    log = (data / "up.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "mesh", "up", "--data-dir", str(data), "--router-port", str(port),
         "--base-port", str(port + 1), "--startup-timeout", "240"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env={**os.environ, **environ})
    try:
        deadline = time.monotonic() + 300
        while "ragloom is up." not in (data / "up.log").read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ragloom up did not come up:\n{(data / 'up.log').read_text()[-4000:]}")
            time.sleep(0.5)
        ingest = subprocess.run([sys.executable, "-m", "mesh", "ingest", "--sample", "--router", address,
                                 "--data-dir", str(data)], capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert ingest.returncode == 0, ingest.stderr
        yield Up(f"http://{address}", address, (data / "pki" / "token").read_text().strip(), data)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """The default mesh: answers stream sentence by sentence, each once it is verified."""
    with ragloom_up(tmp_path_factory.mktemp("console")) as mesh:
        yield mesh


@pytest.fixture(scope="module")
def up_unverified(tmp_path_factory):
    """The router's verification off (RAGLOOM_ROUTER_VERIFY=false): the model's tokens stream as they come.
    (Verified, the bundled 135M model's answers are mostly one sentence, or one quote: one update.)"""
    with ragloom_up(tmp_path_factory.mktemp("console-unverified"), RAGLOOM_ROUTER_VERIFY="false") as mesh:
        yield mesh


@pytest.fixture(scope="module")
def browser():
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        # As root (CI), Chromium's own sandbox cannot start: the page runs only our own console.
        launched = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, request):
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def open_console(page, mesh: Up, token: str | None) -> None:
    page.goto(mesh.url + "/")
    page.wait_for_selector("html[data-ready='true']")
    if token is not None:
        page.fill("#token", token)
        page.press("#token", "Enter")


def ask(page, question: str) -> None:
    page.fill("#question", question)
    page.press("#question", "Enter")
    page.wait_for_function("() => /^(Done|Abstained|Failed|Stopped)/.test(document.querySelector('#answer-state')"
                           ".textContent)", timeout=ANSWER_TIMEOUT_MS)


def test_console_is_served_small_and_fast_on_the_api_port(up, browser):
    sizes = {}
    for served in policy.load().edge.console.files:
        path = served.path
        with urllib.request.urlopen(up.url + path, timeout=10) as reply:
            body = reply.read()
            assert reply.headers["content-type"] == served.content_type
            assert "connect-src 'self'" in reply.headers["content-security-policy"]
            sizes[path] = len(body)
    assert sum(sizes.values()) < 200 * 1024, sizes  # everything the page loads
    page = browser.new_page()
    loads = []
    for _ in range(5):
        page.goto(up.url + "/", wait_until="load")
        loads.append(page.evaluate("() => performance.getEntriesByType('navigation')[0].loadEventEnd"))
    transferred = page.evaluate("() => performance.getEntriesByType('resource').reduce((n, r) => n + r.decodedBodySize, 0)")
    page.close()
    figures = {"bytes": sizes, "load_ms": loads, "subresource_bytes": transferred}
    (ARTIFACTS / "load.json").write_text(json.dumps(figures, indent=2))
    print(f"console: {sum(sizes.values())} bytes; load event after {sorted(loads)[len(loads) // 2]:.0f} ms (median of 5)")


def test_answer_streams_into_the_page_as_it_is_generated(page, up_unverified):
    open_console(page, up_unverified, up_unverified.token)
    # Every change of the answer's text while it is still streaming, as the page's own DOM shows it.
    page.evaluate("""() => {
        window.answerUpdates = [];
        const answer = document.querySelector('#answer');
        new MutationObserver(() => window.answerUpdates.push(
            {text: answer.textContent, streaming: answer.classList.contains('streaming')}
        )).observe(answer, {childList: true, subtree: true, characterData: true});
    }""")
    ask(page, "How does a sourdough starter rise?")
    assert page.text_content("#answer-state") == "Done.", page.text_content("#notices")
    updates = page.evaluate("() => window.answerUpdates")
    streamed = [u["text"] for u in updates if u["streaming"] and u["text"]]
    assert len(set(streamed)) >= 2, f"the answer arrived in {len(set(streamed))} piece(s): {updates}"
    final = page.text_content("#answer")
    assert all(final.startswith(text) for text in streamed)  # each update extends the one before
    assert page.text_content("#timings").startswith("first token ")


def test_citation_jumps_to_its_source_card_with_the_support_highlighted(page, up):
    open_console(page, up, up.token)
    ask(page, "What are drones?")
    assert page.text_content("#answer-state") == "Done.", page.text_content("#notices")
    assert page.locator("#sources .source").count() >= 1
    citation = page.locator("#answer a.cite").first
    number = citation.text_content().strip("[]")
    citation.click()
    card = page.locator(f"#source-{number}")
    assert page.evaluate("() => document.activeElement.id") == f"source-{number}"
    assert "selected" in card.get_attribute("class") and "cited" in card.get_attribute("class")
    support = card.locator("mark.support").first
    assert "drones" in support.text_content().lower()  # the supporting span, scrolled into the card's view
    assert page.evaluate("""() => { const p = document.querySelector('.source.selected .passage');
        const m = p.querySelector('mark.support'); return m.offsetTop >= p.scrollTop &&
        m.offsetTop < p.scrollTop + p.clientHeight; }""")
    assert "honeybees" in card.locator(".doc").text_content()


def test_uploaded_file_is_found_by_asking_and_gone_after_delete(page, up, tmp_path):
    open_console(page, up, up.token)
    name = "harbour-log.txt"
    text = ("The Quendra Bay harbour log records that the lighthouse at Quendra Bay was painted teal in 1931. "
            "The painting was done by the keeper, Ilsa Marrow, who chose teal so ships could see the tower "
            "against the grey cliffs. Before 1931 the tower had been plain white.")
    # Dropped onto the drop zone, as a user drags a file there.
    page.evaluate("""([name, text]) => {
        const data = new DataTransfer();
        data.items.add(new File([text], name, {type: 'text/plain'}));
        document.querySelector('#drop').dispatchEvent(new DragEvent('drop', {dataTransfer: data, bubbles: true}));
    }""", [name, text])
    page.wait_for_selector(".upload.ok, .upload.failed", timeout=60_000)
    assert re.search(r"added: \d+ chunks? on shard \d", page.text_content(".upload")), page.text_content(".upload")
    assert page.locator("#doc-table tbody tr", has_text=name).count() == 1

    ask(page, "Who painted the Quendra Bay lighthouse teal?")
    assert page.text_content("#answer-state") == "Done."
    assert page.locator("#sources .source.cited .doc").all_text_contents() == [name]  # found, and what it cites

    page.click(f"button[aria-label='Delete {name}']")
    page.wait_for_function("() => /^Deleted /.test(document.querySelector('#delete-state').textContent)")
    assert page.locator("#doc-table tbody tr", has_text=name).count() == 0
    ask(page, "Who painted the Quendra Bay lighthouse teal?")
    assert name not in page.locator("#sources .doc").all_text_contents()


def test_off_corpus_question_shows_the_abstention(page, up):
    open_console(page, up, up.token)
    ask(page, "Who won the 1998 FIFA World Cup final, and what was the score?")
    assert page.text_content("#answer-state") == "Abstained."
    assert "Not found in your documents" in page.text_content("#notices")
    assert page.text_content("#sources-heading").startswith("Closest passages")


def test_bad_token_shows_the_401_message(page, up):
    open_console(page, up, "not-a-token")
    ask(page, "How does a sourdough starter rise?")
    message = page.text_content("#notices .error")
    assert "401" in message and "token" in message, message
    assert page.evaluate("() => document.activeElement.id") == "token"
    assert page.text_content("#answer") == ""


def test_keyboard_only(page, up):
    page.goto(up.url + "/")
    page.wait_for_selector("html[data-ready='true']")
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select, button')]
        .filter(e => !e.hidden && !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
        .map(e => e.outerHTML)""")
    assert not unlabelled
    order = []
    for _ in range(12):
        page.keyboard.press("Tab")
        order.append(page.evaluate("() => document.activeElement.id || document.activeElement.textContent.trim()"))
    expected = ["token", "Save", "question", "ask-button", "files", "delete-id"]
    positions = [order.index(e) for e in expected if e in order]
    assert len(positions) == len(expected) and positions == sorted(positions), order

    # Token, question and citation by keys alone.
    while page.evaluate("() => document.activeElement.id") != "token":
        page.keyboard.press("Shift+Tab")
    page.keyboard.type(up.token)
    page.keyboard.press("Enter")  # saves, and moves on to the question
    assert page.evaluate("() => document.activeElement.id") == "question"
    page.keyboard.type("What was the Rosetta Stone's inscription written in?")
    page.keyboard.press("Enter")
    page.wait_for_function("() => /^(Done|Abstained|Failed)/.test(document.querySelector('#answer-state').textContent)",
                           timeout=ANSWER_TIMEOUT_MS)
    assert page.text_content("#answer-state") == "Done.", page.text_content("#notices")
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.classList.contains('cite')"):
            break
    else:
        pytest.fail("no citation link is reachable by Tab")
    target = page.evaluate("() => document.activeElement.hash.slice(1)")
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == target


@pytest.mark.parametrize("body, says", [
    # Cut off after one sentence: no closing bracket, no `done`.
    ('[{"sources":{"sources":[],"coverage":{}}},{"token":"Half an answer. "}', "cut off"),
    # The router's own report of a failure midway (what AskStream sends before its failing status).
    ('[{"sources":{"sources":[],"coverage":{}}},{"token":"Half an answer. "},'
     '{"error":{"code":14,"message":"generator Generate: UNAVAILABLE: connection refused"}}]', "generator Generate"),
])
def test_failed_stream_is_shown_as_failed_never_as_complete(page, up, body, says):
    open_console(page, up, up.token)
    page.route("**/v1/ask:stream", lambda route: route.fulfill(status=200, content_type="application/json", body=body))
    ask(page, "Anything at all?")
    assert page.text_content("#answer") == "Half an answer. "
    assert says in page.text_content("#notices .error")
    assert page.text_content("#answer-state").startswith("Failed: the answer above is incomplete")
    assert "incomplete" in page.get_attribute("#answer", "class")


def test_partial_coverage_names_the_missing_shards(page, up):
    open_console(page, up, up.token)
    events = [{"sources": {"sources": [], "coverage": {"partial": True, "shards_answered": [0], "shards_failed": [1],
                                                       "degraded": []}}},
              {"token": "An answer from shard 0 alone. "},
              {"done": {"citations": [], "timings": {"time_to_first_token_ms": 5, "total_ms": 9}}}]
    page.route("**/v1/ask:stream", lambda route: route.fulfill(status=200, content_type="application/json",
                                                               body=json.dumps(events)))
    ask(page, "Anything at all?")
    warning = page.text_content("#notices .warning")
    assert "shard 1 did not answer" in warning and "shards 0" in warning, warning
    assert page.text_content("#answer-state") == "Done."


def test_stream_reader_splits_objects_at_any_chunk_boundary(page, up):
    page.goto(up.url + "/")
    page.wait_for_selector("html[data-ready='true']")
    events = [{"sources": {"sources": [{"text": 'a "quoted" {brace} [bracket] \\ back\\slash', "number": 1}]}},
              {"token": "ünïcödé ✓ ]}, \"tricky\" "}, {"done": {"citations": [1]}}]
    text = json.dumps(events, ensure_ascii=False)
    seen = page.evaluate("""async (text) => {
        const { JsonArrayReader } = await import('/console/console.js');
        const results = [];
        for (let cut = 0; cut <= text.length; cut++) {
            const reader = new JsonArrayReader();
            const objects = [...reader.push(text.slice(0, cut)), ...reader.push(text.slice(cut))];
            results.push({objects, closed: reader.closed});
        }
        return results;
    }""", text)
    assert all(r["objects"] == events and r["closed"] for r in seen)


def test_a_marker_split_across_tokens_still_links_its_source(page, up):
    open_console(page, up, up.token)
    events = [{"sources": {"sources": [{"number": 2, "document_id": "d", "text": "Drones are males.", "score": 0.9,
                                        "shard_id": 0, "evidence": []}], "coverage": {}}},
              {"token": "Drones are males "}, {"token": "["}, {"token": "2"}, {"token": "]. Not [9]"},
              {"done": {"citations": [2], "timings": {}}}]
    page.route("**/v1/ask:stream", lambda route: route.fulfill(status=200, content_type="application/json",
                                                               body=json.dumps(events)))
    ask(page, "What are drones?")
    assert page.text_content("#answer") == "Drones are males [2]. Not [9]"
    assert page.locator("#answer a.cite").all_text_contents() == ["[2]"]  # [9] is no source: plain text
