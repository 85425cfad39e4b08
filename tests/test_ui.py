"""
The chat page (nanochat/ui.html) in a real browser (Debian's chromium driven by Playwright, as in
tests/test_chat_web.py; skipped when absent): a calculator call streamed as
<|python_start|>expr<|python_end|><|output_start|>result<|output_end|> is shown as a block (expression and
result), never as raw markers, whether the markers arrive as special tokens or as plain text split over many
token events; each reply shows its token count and tokens/s. The page's own parser is also run on every
prefix of a few replies, as a stream would cut them.
"""
import os
import re

import pytest
from test_chat_web import ARTIFACTS, CHROMIUM, CHROMIUM_FLAGS, FakeEngine, live_server, make_app

CALL = "<|python_start|>12+30<|python_end|><|output_start|>42<|output_end|>"
REPLY = f"Let me add them: {CALL} so the answer is 42."
MARKER = re.compile(r"(<\|(?:python|output)_(?:start|end)\|>)")
DELAY = 0.02  # seconds per token of the fake engine


class SpecialTokens:
    """The tokenizer, but encode() turns the tool markers in a text into their special tokens, one each, as
    the engine generates them; everything else is the tokenizer's."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text):
        ids = []
        for piece in MARKER.split(text):
            if MARKER.fullmatch(piece):
                ids.append(self.tok.encode_special(piece))
            elif piece:
                ids += self.tok.encode(piece)
        return ids


@pytest.fixture(scope="module")
def chat_page(tokenizer, tmp_path_factory):
    """(page, engine) on a live server whose FakeEngine replies REPLY, DELAY seconds per token."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    engine = FakeEngine(tokenizer, delay=DELAY, reply=REPLY)
    app = make_app(engine, tokenizer, max_tokens=512)
    with live_server(app) as base, sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM,
                                                   headless=True, args=CHROMIUM_FLAGS,
                                                   viewport={"width": 1200, "height": 800})
        try:
            page = ctx.new_page()
            page.set_default_timeout(15000)
            page.goto(base + "/")
            yield page, engine
        finally:
            ctx.close()


@pytest.mark.parametrize("markers", ["special tokens", "split plain text"])
def test_calculator_call_is_a_block_and_the_speed_is_shown(chat_page, tokenizer, markers):
    page, engine = chat_page
    engine.tok = SpecialTokens(tokenizer) if markers == "special tokens" else tokenizer
    n_tokens = len(engine.tok.encode(REPLY))
    if markers == "split plain text":
        assert n_tokens > len(SpecialTokens(tokenizer).encode(REPLY)) + 8, "the markers should span several tokens"
    page.click("#new-chat")
    # every state of the streaming reply, as the page shows it
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const c = document.querySelector('.msg.assistant.streaming .content');
            if (c) window.seen.push(c.textContent);
        }).observe(document.querySelector('#log'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", "What is 12+30?")
    page.press("#input", "Enter")
    page.wait_for_selector("body[data-busy=false]")

    reply = page.locator(".msg.assistant .content")
    assert reply.locator(".tool").count() == 1
    assert reply.locator(".tool .tool-name").inner_text().lower() == "calculator"
    assert reply.locator(".tool .tool-expr").inner_text() == "12+30"
    assert reply.locator(".tool .tool-result").inner_text() == "42"
    text = reply.inner_text()
    assert text.startswith("Let me add them:") and text.rstrip().endswith("so the answer is 42.")
    assert "<|" not in text and "python" not in text and "output" not in text

    seen = page.evaluate("window.seen")
    assert len(seen) > 10, "the reply should have been seen streaming"
    for shown in seen:
        assert "<|" not in shown and "python_" not in shown and "output_" not in shown and not shown.endswith("<"), shown
    assert any("\u2026" in s and "12+30" in s for s in seen), "the call shows as pending until its result arrives"

    speed = page.locator(".msg.assistant .speed").inner_text()
    m = re.fullmatch(r"(\d+) tokens \u00b7 ([\d.]+) tokens/s", speed)
    assert m, speed
    assert int(m[1]) == n_tokens  # completion_tokens of the final event
    assert 0 < float(m[2]) < 2 / DELAY, speed  # at most one token per DELAY is made
    if markers == "special tokens":
        os.makedirs(ARTIFACTS, exist_ok=True)
        page.screenshot(path=os.path.join(ARTIFACTS, "chat_web_calculator.png"))


def parse_every_prefix(page, text):
    """The page's parseReply on every prefix of `text` while streaming, and on the whole text when done."""
    return page.evaluate("""(text) => {
        const streaming = [];
        for (let k = 0; k <= text.length; k++) streaming.push(parseReply(text.slice(0, k), true));
        return {streaming, done: parseReply(text, false)};
    }""", text)


def visible(parts):
    return "".join(p["text"] if "text" in p else f"[{p['expr']}={p['result']}]" for p in parts)


@pytest.mark.parametrize("text, done", [
    (REPLY, [{"text": "Let me add them: "}, {"expr": "12+30", "result": "42", "open": False},
             {"text": " so the answer is 42."}]),
    ("<|python_start|>import os<|python_end|> never mind",  # the calculator refused it: no output part
     [{"expr": "import os", "result": None, "open": False}, {"text": " never mind"}]),
    (f"{CALL}{CALL}", [{"expr": "12+30", "result": "42", "open": False}] * 2),
    ("so a < b and <|x|> is text", [{"text": "so a < b and <|x|> is text"}]),
    ("cut <|python_start|>1+", [{"text": "cut "}, {"expr": "1+", "result": None, "open": False}]),
])
def test_reply_parser_on_every_prefix(chat_page, text, done):
    page, _ = chat_page
    out = parse_every_prefix(page, text)
    assert out["done"] == done
    literal_angle = "<" in MARKER.sub("", text)
    for k, parts in enumerate(out["streaming"]):
        shown = visible(parts)
        assert "_start|" not in shown and "_end|" not in shown, (k, parts)
        if not literal_angle:
            assert "<" not in shown, (k, parts)  # a marker's first characters are held back until it is complete
        assert all(p.get("text") != "" for p in parts)
        # a call followed by anything is complete; only the last part can still be arriving
        assert not any(p.get("open") for p in parts[:-1]), (k, parts)
    assert visible(out["streaming"][-1]) == visible(done)
