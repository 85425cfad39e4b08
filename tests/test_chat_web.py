"""
The web chat server (scripts/chat_web.py over nanochat/serve.py) and its page (nanochat/ui.html): the API
through FastAPI's test client and a live uvicorn server on 127.0.0.1, the official `openai` client, a real
browser (Debian's chromium driven by Playwright; skipped when absent) and a load test with 50 concurrent
streaming clients.

Most tests drive a FakeEngine that replies with scripted text token by token (deterministic streaming,
slow or endless replies for disconnect and queue tests). The openai, load and CLI tests use a real tiny
GPT through nanochat.engine.Engine.
Screenshots land in tests/artifacts/ (git-ignored).
"""
import asyncio
import contextlib
import gc
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from functools import partial
from types import SimpleNamespace

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat.batching import BatchScheduler
from nanochat.engine import Engine
from nanochat.serve import RequestError, ServeConfig, parse_request, serve_in_thread
from nanochat.workers import Worker, WorkerPool
from nanochat.tokenizer import StreamDecoder
from scripts.chat_web import create_app, get_parser, main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(REPO_ROOT, "tests", "artifacts")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


# -----------------------------------------------------------------------------
# Engines

class FakeEngine:
    """Replies "echo: <last user message> #<call> t=<temperature> k=<top_k>" one token per step, then
    <|assistant_end|>. endless: repeats forever (until closed); delay: seconds per token; fail_after: raises."""

    def __init__(self, tokenizer, delay=0.0, endless=False, fail_after=None, reply=None):
        self.tok, self.delay, self.endless, self.fail_after, self.reply = tokenizer, delay, endless, fail_after, reply
        self.calls, self.closed, self.yielded = [], 0, 0
        self.end = tokenizer.encode_special("<|assistant_end|>")

    def text_for(self, prompt, call, temperature, top_k):
        if self.reply is not None:
            return self.reply
        text = self.tok.decode(prompt)
        last_user = text.rsplit("<|user_start|>", 1)[1].split("<|user_end|>", 1)[0]
        return f"echo: {last_user} #{call} t={temperature:g} k={top_k}"

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        assert num_samples == 1
        self.calls.append(dict(tokens=list(tokens), max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed))
        ids = self.tok.encode(self.text_for(tokens, len(self.calls), temperature, top_k))
        try:
            n = 0
            while max_tokens is None or n < max_tokens:
                if self.fail_after is not None and n >= self.fail_after:
                    raise RuntimeError("the fake engine failed on purpose")
                token = ids[n % len(ids)] if self.endless or n < len(ids) else self.end
                if self.delay:
                    time.sleep(self.delay)
                self.yielded += 1
                yield [token], [1]
                n += 1
                if token == self.end:
                    return
        finally:
            self.closed += 1


def tiny_model(tokenizer, sequence_len=128):
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=sequence_len, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                       n_kv_head=2, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(0)
    with torch.no_grad():  # the zero-initialized projections would make every logit equal
        for p in model.parameters():
            if p.dim() == 2 and not p.abs().sum():
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tokenizer):
    """(engine, model): the real Engine over a tiny GPT."""
    model = tiny_model(tokenizer)
    return Engine(model, tokenizer), model


# -----------------------------------------------------------------------------
# Apps and servers

class GeneratorScheduler:
    """The scheduler interface (nanochat.batching.BatchScheduler's submit / step / has_work / max_batch) over an
    engine with only generate(): each active request's generator advances one token per step, so the
    FakeEngine's scripted replies (slow, endless, failing) reach the server as a real scheduler's would."""

    def __init__(self, engine, max_batch=1):
        self.engine, self.max_batch, self.waiting, self.active = engine, max_batch, [], []

    def submit(self, tokens, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        request = SimpleRequest(self.engine.generate(tokens, 1, max_tokens, temperature, top_k, top_p, seed))
        self.waiting.append(request)
        return request

    def has_work(self):
        return bool(self.waiting or self.active)

    def step(self):
        for r in [r for r in self.active if r.cancelled]:
            r.finish("cancelled")
            self.active.remove(r)
        while self.waiting and len(self.active) < self.max_batch:
            self.active.append(self.waiting.pop(0))
        events = []
        for r in list(self.active):
            try:
                column, _ = next(r.gen)
            except StopIteration:
                r.finish("length")
                self.active.remove(r)
                continue
            events.append(SimpleNamespace(request=r, token=column[0]))
            if column[0] == self.engine.end:
                r.finish("stop")
                self.active.remove(r)
        return events


class SimpleRequest:
    def __init__(self, gen):
        self.gen, self.finish_reason, self.cancelled = gen, None, False

    def cancel(self):
        self.cancelled = True

    def finish(self, reason):
        self.finish_reason = reason
        self.gen.close()


def make_app(engine, tokenizer, context_len=None, max_batch=1, **overrides):
    """The app over one worker: a FakeEngine through GeneratorScheduler, a real Engine through BatchScheduler."""
    config = ServeConfig(**{**asdict(ServeConfig(temperature=0.8, top_k=50, max_tokens=64)), **overrides})
    make = (partial(BatchScheduler, engine, max_batch) if isinstance(engine, Engine)
            else partial(GeneratorScheduler, engine, max_batch))
    pool = WorkerPool([Worker(make, tokenizer, "cpu", context_len=context_len)], config.max_queue)
    return create_app(pool, config, model_id="nanochat-test")


@contextlib.contextmanager
def client_for_app(app):
    from fastapi.testclient import TestClient
    with TestClient(app) as client:
        yield client


def client_for(engine, tokenizer, **overrides):
    return client_for_app(make_app(engine, tokenizer, **overrides))


live_server = serve_in_thread  # uvicorn in a thread on 127.0.0.1, as chat_web serves


def sse_data(text):
    """The data payloads of an SSE body, in order."""
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def wait_until(predicate, timeout=5.0, what="condition"):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


USER = [{"role": "user", "content": "Hello there"}]


# -----------------------------------------------------------------------------
# Streaming decoder

def test_stream_decoder_holds_back_split_characters(tokenizer):
    byte_token = {b: tokenizer.mergeable_ranks[bytes([b])] for b in range(256)}
    text = "héllo 世界 🎉!"
    ids = [byte_token[b] for b in text.encode()]  # one token per byte: every multi-byte character is split
    d = StreamDecoder(tokenizer)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[ids.index(byte_token[0xF0])] == ""  # the emoji's first byte alone shows nothing
    # invalid bytes come out as U+FFFD, at the latest on flush
    d = StreamDecoder(tokenizer)
    out = "".join(d.push(i) for i in [byte_token[0x61], byte_token[0xFF], byte_token[0xE4], byte_token[0x62]]) + d.flush()
    assert out == tokenizer.decode([byte_token[0x61], byte_token[0xFF], byte_token[0xE4], byte_token[0x62]]) == "a\ufffd\ufffdb"
    d = StreamDecoder(tokenizer)
    assert d.push(byte_token[0xE4]) == "" and d.flush() == "\ufffd"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40), cuts=st.lists(st.integers(1, 6), max_size=40))
def test_stream_decoder_matches_decode(tokenizer, text, cuts):
    """Any split of any text into tokens: the pieces concatenate to decode(all), none has a broken character."""
    ids = tokenizer.encode(text)
    byte_token = lambda b: tokenizer.mergeable_ranks[bytes([b])]
    # re-split some tokens into single bytes, so characters straddle token boundaries
    mixed = []
    for k, i in enumerate(ids):
        if cuts and cuts[k % len(cuts)] % 2:
            mixed += [byte_token(b) for b in tokenizer.enc.decode_single_token_bytes(i)]
        else:
            mixed.append(i)
    d = StreamDecoder(tokenizer)
    pieces = [d.push(i) for i in mixed] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


# -----------------------------------------------------------------------------
# Replies through the test client

def test_page_is_served_self_contained(tokenizer):
    with client_for(FakeEngine(tokenizer), tokenizer) as client:
        r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<textarea" in r.text and "chat/completions" in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text), "the page must not load external resources"
    assert "@import" not in r.text and "url(http" not in r.text


def test_page_endpoint_streams(tokenizer):
    engine = FakeEngine(tokenizer)
    with client_for(engine, tokenizer) as client:
        r = client.post("/chat/completions", json={"messages": USER})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(d) for d in sse_data(r.text)]
    text = "".join(e.get("token", "") for e in events)
    assert text == "echo: Hello there #1 t=0.8 k=50"
    assert len([e for e in events if "token" in e]) > 3, "tokens arrive as separate events"
    done = events[-1]
    assert done["done"] is True and done["finish_reason"] == "stop"
    assert done["completion_tokens"] == len(tokenizer.encode(text))
    assert done["prompt_tokens"] == len(tokenizer.render_for_completion({"messages": USER}))
    call = engine.calls[0]
    assert call["tokens"] == tokenizer.render_for_completion({"messages": USER})
    assert call["temperature"] == 0.8 and call["top_k"] == 50 and call["max_tokens"] == 64 and call["top_p"] is None


def test_openai_non_streaming_and_streaming(tokenizer):
    engine = FakeEngine(tokenizer)
    with client_for(engine, tokenizer) as client:
        body = {"model": "nanochat-test", "messages": USER, "temperature": 0.5, "top_k": 7, "top_p": 0.9, "seed": 3}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        out = r.json()
        assert out["object"] == "chat.completion" and out["model"] == "nanochat-test" and out["id"].startswith("chatcmpl-")
        choice = out["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": "echo: Hello there #1 t=0.5 k=7"}
        assert choice["finish_reason"] == "stop" and choice["index"] == 0
        usage = out["usage"]
        assert usage["completion_tokens"] == len(tokenizer.encode(choice["message"]["content"]))
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert engine.calls[0]["top_p"] == 0.9 and engine.calls[0]["seed"] == 3

        r = client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
        assert r.status_code == 200
        data = sse_data(r.text)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "echo: Hello there #2 t=0.5 k=7"
        assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == usage["completion_tokens"]


def test_max_tokens_gives_finish_length_and_seeds_differ(tokenizer):
    engine = FakeEngine(tokenizer, endless=True)
    with client_for(engine, tokenizer) as client:
        out = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 5}).json()
        client.post("/v1/chat/completions", json={"messages": USER, "max_completion_tokens": 2})
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 5
    assert [c["max_tokens"] for c in engine.calls] == [5, 2]
    assert engine.calls[0]["seed"] != engine.calls[1]["seed"], "without a seed each request samples afresh"


def test_context_length_is_enforced(tokenizer):
    engine = FakeEngine(tokenizer, endless=True)
    with client_for(engine, tokenizer, context_len=40) as client:
        prompt_len = len(tokenizer.render_for_completion({"messages": USER}))
        out = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 500}).json()
        assert out["usage"]["completion_tokens"] == 40 - prompt_len  # max_tokens clamped to the room left
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 60}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "context is 40 tokens" in r.json()["error"]["message"]


def test_models_health_stats(tokenizer):
    with client_for(FakeEngine(tokenizer), tokenizer) as client:
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "nanochat-test"
        assert models["data"][0]["object"] == "model"
        assert client.get("/v1/models/nanochat-test").json()["id"] == "nanochat-test"
        assert client.get("/v1/models/gpt-4").status_code == 404
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["workers"] == 1
        assert health["defaults"] == {"temperature": 0.8, "top_k": 50, "max_tokens": 64}
        assert health["limits"]["max_messages"] == ServeConfig().max_messages
        client.post("/chat/completions", json={"messages": USER})
        client.post("/chat/completions", json={"messages": []})
        stats = client.get("/stats").json()
    assert stats["workers"] == 1 and stats["busy"] == 0 and stats["queue"] == 0
    assert stats["requests"] == 2 and stats["served"] == 1 and stats["rejected"] == 1
    assert stats["tokens"] > 0 and stats["tokens_per_second"] > 0 and stats["recent_tokens_per_second"] > 0
    assert stats["worker_list"][0]["served"] == 1


def test_generation_failure_is_reported_and_frees_the_worker(tokenizer):
    engine = FakeEngine(tokenizer, fail_after=2)
    with client_for(engine, tokenizer) as client:
        r = client.post("/chat/completions", json={"messages": USER})
        assert r.status_code == 200
        last = json.loads(sse_data(r.text)[-1])
        assert "fake engine failed on purpose" in last["error"]
        r = client.post("/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 500 and "failed on purpose" in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
        data = sse_data(r.text)
        assert data[-1] == "[DONE]" and "failed on purpose" in json.loads(data[-2])["error"]["message"]
        stats = client.get("/stats").json()
    assert stats["busy"] == 0 and stats["failed"] == 3 and engine.closed == 3


def test_log_line_per_request(tokenizer, capsys):
    with client_for(FakeEngine(tokenizer), tokenizer) as client:
        client.post("/chat/completions", json={"messages": USER})
        client.post("/v1/chat/completions", json={"messages": USER, "temperature": 9})
    lines = [line for line in capsys.readouterr().out.splitlines() if "/chat/completions" in line]
    assert len(lines) == 2
    ok, bad = lines
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d POST /chat/completions 200 \d+\.\d+s ", ok)
    for field in ("messages=1", "chars=11", "prompt_tokens=", "completion_tokens=", "finish=stop", "worker=cpu"):
        assert field in ok
    assert " 400 " in bad and "error=invalid_value" in bad


# -----------------------------------------------------------------------------
# Limits and bad input: 4xx JSON errors naming the limit, never a 500

def msgs(*contents):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": c} for i, c in enumerate(contents)]


LIMIT_CASES = [
    # (name, body or raw bytes, status, text the error message must contain, code)
    ("too many messages", {"messages": msgs(*["hi"] * 7)}, 400, "--max-messages=5", "too_many_messages"),
    ("message too long", {"messages": msgs("x" * 101)}, 400, "--max-message-chars=100", "message_too_long"),
    ("total too long", {"messages": msgs("x" * 90, "y" * 90, "z" * 90)}, 400, "--max-total-chars=250", "conversation_too_long"),
    ("temperature high", {"messages": USER, "temperature": 1.6}, 400, "--max-temperature=1.5", "invalid_value"),
    ("temperature negative", {"messages": USER, "temperature": -0.1}, 400, "'temperature'", "invalid_value"),
    ("temperature string", {"messages": USER, "temperature": "hot"}, 400, "'temperature' must be a number", "invalid_type"),
    ("top_k high", {"messages": USER, "top_k": 21}, 400, "--max-top-k=20", "invalid_value"),
    ("top_k float", {"messages": USER, "top_k": 2.5}, 400, "'top_k' must be an integer", "invalid_type"),
    ("top_p zero", {"messages": USER, "top_p": 0}, 400, "'top_p'", "invalid_value"),
    ("max_tokens high", {"messages": USER, "max_tokens": 33}, 400, "--max-tokens-limit=32", "invalid_value"),
    ("max_tokens zero", {"messages": USER, "max_tokens": 0}, 400, "'max_tokens'", "invalid_value"),
    ("max_tokens bool", {"messages": USER, "max_tokens": True}, 400, "'max_tokens' must be an integer", "invalid_type"),
    ("both token fields", {"messages": USER, "max_tokens": 3, "max_completion_tokens": 3}, 400, "not both", "invalid_value"),
    ("n=2 on one slot", {"messages": USER, "n": 2}, 400, "decodes at most 1 sequences together (server limit --max-batch)",
     "invalid_value"),
    ("n=9", {"messages": USER, "n": 9}, 400, "'n' must be in [1, 8], got 9 (server limit --max-n=8)", "invalid_value"),
    ("n=0", {"messages": USER, "n": 0}, 400, "'n' must be in [1, 8]", "invalid_value"),
    ("stop list too long", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "up to 4 strings", "invalid_value"),
    ("stop not text", {"messages": USER, "stop": 5}, 400, "'stop' must be a string", "invalid_type"),
    ("top_logprobs without logprobs", {"messages": USER, "top_logprobs": 2}, 400, "needs 'logprobs'", "invalid_value"),
    ("top_logprobs over 20", {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "'top_logprobs' must be in",
     "invalid_value"),
    ("stream not bool", {"messages": USER, "stream": "yes"}, 400, "'stream'", "invalid_type"),
    ("stream_options", {"messages": USER, "stream_options": {"include_usage": "y"}}, 400, "include_usage", "invalid_type"),
    ("empty body", b"", 400, "empty request body", "empty_body"),
    ("whitespace body", b"  \n", 400, "empty request body", "empty_body"),
    ("malformed json", b'{"messages": [', 400, "malformed JSON", "malformed_json"),
    ("not utf-8", b'{"messages": "\xff"}', 400, "UTF-8", "malformed_json"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 413, "--max-body-bytes=150000", "body_too_large"),
    ("nesting under the size limit", b"[" * 70_000 + b"]" * 70_000, 400, "malformed JSON", "malformed_json"),
    ("huge integer", b'{"messages": [], "max_tokens": 1' + b"0" * 5000 + b"}", 400, "malformed JSON", "malformed_json"),
    ("body is a list", [USER], 400, "must be a JSON object", "invalid_type"),
    ("no messages", {"prompt": "hi"}, 400, "'messages' is required", "missing_field"),
    ("empty messages", {"messages": []}, 400, "'messages' is empty", "empty_messages"),
    ("messages not a list", {"messages": "hi"}, 400, "must be a list", "invalid_type"),
    ("message not object", {"messages": ["hi"]}, 400, "messages[0] must be an object", "invalid_type"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", "invalid_role"),
    ("missing role", {"messages": [{"content": "x"}]}, 400, "messages[0].role", "invalid_role"),
    ("starts with assistant", {"messages": [{"role": "assistant", "content": "x"}, *USER]}, 400, "expected 'user'", "invalid_role"),
    ("two users in a row", {"messages": [*USER, *USER]}, 400, "messages[1] has role 'user', expected 'assistant'", "invalid_role"),
    ("ends with assistant", {"messages": msgs("a", "b")}, 400, "last message must have role 'user'", "invalid_role"),
    ("system only", {"messages": [{"role": "system", "content": "be nice"}]}, 400, "last message", "invalid_role"),
    ("system in the middle", {"messages": [*msgs("a", "b"), {"role": "system", "content": "x"}, *USER]}, 400,
     "messages[2] has role 'system'", "invalid_role"),
    ("lone surrogate role", b'{"messages": [{"role": "\\ud800", "content": "x"}]}', 400, "messages[0].role", "invalid_role"),
    ("content null", {"messages": [{"role": "user", "content": None}]}, 400, "content must be a string", "invalid_type"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "only text parts", "unsupported_content"),
]
LIMITS = dict(max_messages=5, max_message_chars=100, max_total_chars=250, max_temperature=1.5, max_top_k=20,
              max_tokens_limit=32, max_body_bytes=150_000, max_tokens=8)


def test_limits_and_bad_input(tokenizer):
    engine = FakeEngine(tokenizer)
    with client_for(engine, tokenizer, **LIMITS) as client:
        for path in ("/v1/chat/completions", "/chat/completions"):
            for name, body, status, text, code in LIMIT_CASES:
                kw = {"content": body} if isinstance(body, bytes) else {"json": body}
                r = client.post(path, **kw)
                assert r.status_code == status, (path, name, r.status_code, r.text[:200])
                err = r.json()["error"]
                assert text in err["message"], (name, err)
                assert err["code"] == code and err["type"] == "invalid_request_error", (name, err)
        assert client.get("/stats").json()["rejected"] == 2 * len(LIMIT_CASES)
        # the same request within the limits works
        ok = {"messages": msgs(*["x" * 50] * 5), "temperature": 1.5, "top_k": 20, "max_tokens": 32, "top_p": 1}
        assert client.post("/v1/chat/completions", json=ok).status_code == 200
        # a declared Content-Length over the limit is refused before the body is read
        r = client.post("/v1/chat/completions", content=b"{}", headers={"content-length": "999999999"})
        assert r.status_code == 413
        assert client.get("/nope").status_code == 404 and "error" in client.get("/nope").json()
        assert client.get("/v1/chat/completions").status_code == 405
    assert len(engine.calls) == 1


def test_unknown_fields_are_ignored_and_known_shapes_accepted(tokenizer):
    engine = FakeEngine(tokenizer)
    with client_for(engine, tokenizer) as client:
        body = {"messages": [{"role": "developer", "content": "Be brief.", "name": "ops"},
                             {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}],
                "model": "whatever", "stream_options": {"include_usage": False}, "frequency_penalty": 0.5,
                "presence_penalty": 0, "user": "u1", "logit_bias": {}, "stop": None, "tools": [], "frobnicate": [1, 2],
                "temperature": None, "top_k": None, "max_tokens": None, "n": 1}
        r = client.post("/v1/chat/completions", json=body)
        # a lone surrogate (valid JSON, not valid Unicode) is encoded as U+FFFD, not a crash
        r2 = client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "lone \\ud800"}]}')
    assert r2.status_code == 200 and r2.json()["choices"][0]["message"]["content"].startswith("echo: lone \ufffd"), r2.text
    assert r.status_code == 200, r.text
    # the system message is merged into the first user turn by the tokenizer's chat rendering
    assert "echo: Be brief.\n\nHello there #1 t=0.8 k=50" == r.json()["choices"][0]["message"]["content"]


@st.composite
def bodies(draw):
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.text(max_size=8))
    anything = st.recursive(scalar, lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=5), c, max_size=3)),
                            max_leaves=6)
    role = st.one_of(st.sampled_from(["user", "assistant", "system", "developer", "tool"]), anything)
    message = st.fixed_dictionaries({"role": role, "content": st.one_of(st.text(max_size=30), anything)})
    body = draw(st.dictionaries(st.sampled_from(["messages", "temperature", "top_k", "top_p", "max_tokens", "n", "stream",
                                                 "stream_options", "seed", "model", "extra"]), anything, max_size=5))
    if draw(st.booleans()):
        body["messages"] = draw(st.lists(message, min_size=1, max_size=4))
    return body


def test_random_bodies_never_give_a_500(tokenizer):
    with client_for(FakeEngine(tokenizer, reply="ok"), tokenizer, max_messages=3, max_message_chars=20, max_tokens=4) as client:
        @settings(max_examples=150, deadline=None)
        @given(body=bodies())
        def check(body):
            r = client.post("/v1/chat/completions", content=json.dumps(body))
            assert r.status_code in (200, 400), (body, r.status_code, r.text[:300])
            if r.status_code == 400:
                assert r.json()["error"]["message"]
        check()


def test_parse_request_defaults():
    req = parse_request(json.dumps({"messages": USER}).encode(), ServeConfig(temperature=0.3, top_k=5, max_tokens=9))
    assert (req.temperature, req.top_k, req.max_tokens, req.top_p, req.stream) == (0.3, 5, 9, 1.0, False)
    with pytest.raises(RequestError):
        parse_request(b'{"messages": [], "temperature": NaN}', ServeConfig())
    req = parse_request(json.dumps({"messages": USER, "temperature": 0}).encode(), ServeConfig())
    assert req.temperature == 0.0


# -----------------------------------------------------------------------------
# Hostile clients: numeric extremes, broken files, slow and too many connections

def test_numeric_extremes_are_served_not_crashed(tokenizer, tiny):
    """Values that pass validation but used to crash sampling with a 500: now a temperature below 1e-4 is
    greedy and the most likely token always survives top_p. Non-finite values stay 400s."""
    engine, _ = tiny
    with client_for(engine, tokenizer, max_tokens=6) as client:
        def reply(**kw):
            r = client.post("/v1/chat/completions", json={"messages": USER, "seed": 1, **kw})
            assert r.status_code == 200, (kw, r.text[:300])
            return r.json()["choices"][0]["message"]["content"]
        greedy = reply(temperature=0)
        for kw in (dict(temperature=1e-300), dict(temperature=5e-324), dict(top_p=1e-46), dict(temperature=1e-300, top_p=1e-46),
                   dict(temperature=2.0, top_p=1e-46)):
            assert reply(**kw) == greedy, kw
        for raw in ('{"messages": %s, "temperature": NaN}', '{"messages": %s, "top_p": Infinity}',
                    '{"messages": %s, "temperature": 1e999}', '{"messages": %s, "top_p": -0.0}'):
            r = client.post("/v1/chat/completions", content=raw % json.dumps(USER))
            assert r.status_code == 400 and r.json()["error"]["param"] in ("temperature", "top_p"), raw


def test_internal_errors_are_json_and_the_server_stays_up(tokenizer):
    """A tampered tokenizer (its special tokens gone) fails inside a request: the client gets OpenAI's JSON
    error shape with a 500, the request is logged and counted, and the next request is served."""
    class Tampered:
        broken = True

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def render_for_completion(self, conversation):
            if self.broken:
                raise KeyError("<|user_start|>")
            return tokenizer.render_for_completion(conversation)

    tampered = Tampered()
    with client_for(FakeEngine(tokenizer, reply="fine"), tampered) as client:
        for path in ("/v1/chat/completions", "/chat/completions"):
            r = client.post(path, json={"messages": USER})
            assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
            error = r.json()["error"]
            assert error["code"] == "internal_error" and "KeyError" in error["message"] and error["type"] == "server_error"
        tampered.broken = False
        r = client.post("/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
        assert client.get("/stats").json()["failed"] == 2


def raw_exchange(base, chunks, pause, timeout=10.0):
    """Send `chunks` over a raw socket with `pause` seconds between them (ignoring a closed connection);
    return (everything the server sent, seconds until it closed the connection)."""
    host, port = base.rsplit("/", 1)[1].split(":")
    t0, received = time.time(), b""
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except OSError:
                break
            time.sleep(pause)
        s.settimeout(max(0.1, timeout - (time.time() - t0)))
        with contextlib.suppress(OSError):
            while data := s.recv(65536):
                received += data
    return received, time.time() - t0


def test_slow_clients_are_timed_out(tokenizer):
    """Headers or a body trickled byte by byte get a 408 and lose their connection at the deadline, while
    other clients are served meanwhile."""
    app = make_app(FakeEngine(tokenizer, reply="ok"), tokenizer, header_timeout=0.6, body_timeout=0.6)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = json.dumps({"messages": USER}).encode()
    with live_server(app) as base:
        results = {}

        def trickle(name, chunks):
            results[name] = raw_exchange(base, chunks, pause=0.1)

        slow = [threading.Thread(target=trickle, args=("headers", [bytes([b]) for b in head * 3])),
                threading.Thread(target=trickle, args=("body", [head + b"Content-Length: %d\r\n\r\n" % len(body)]
                                                       + [bytes([b]) for b in body]))]
        for t in slow:
            t.start()
        time.sleep(0.2)
        r = httpx.post(f"{base}/v1/chat/completions", json={"messages": USER}, timeout=10)  # served meanwhile
        assert r.status_code == 200
        for t in slow:
            t.join(15)
        sent, seconds = results["headers"]
        assert sent.startswith(b"HTTP/1.1 408") and seconds < 3, (sent[:100], seconds)
        sent, seconds = results["body"]
        assert sent.startswith(b"HTTP/1.1 408") and b"body_timeout" in sent and seconds < 3, (sent[:300], seconds)
        # a client that keeps its connection alive and then trickles the next request is cut off too
        fast = head.replace(b"POST /v1/chat/completions", b"GET /health") + b"\r\n"
        sent, seconds = raw_exchange(base, [fast] + [bytes([b]) for b in fast * 3], pause=0.1)
        assert sent.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in sent and seconds < 3, (sent[-200:], seconds)
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200


def test_connections_beyond_the_cap_get_503(tokenizer):
    app = make_app(FakeEngine(tokenizer, reply="ok"), tokenizer, max_connections=2, header_timeout=30)
    with live_server(app) as base:
        host, port = base.rsplit("/", 1)[1].split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]
        try:
            time.sleep(0.2)
            r = httpx.get(f"{base}/health", timeout=10)
            assert r.status_code == 503
        finally:
            for s in idle:
                s.close()
        wait_until(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 200, what="the cap to free up")


# -----------------------------------------------------------------------------
# Disconnects and the queue, against a live uvicorn server

def stream_a_few(base, n_events, body=None, path="/chat/completions"):
    """Start a streaming request, read n_events events, then drop the connection."""
    with httpx.Client(base_url=base, timeout=10) as client:
        with client.stream("POST", path, json=body or {"messages": USER}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= n_events:
                        break


def test_client_disconnect_frees_the_worker(tokenizer):
    engine = FakeEngine(tokenizer, endless=True, delay=0.01)
    app = make_app(engine, tokenizer, max_tokens=2048, max_tokens_limit=4096)
    pool = app.state.pool
    with live_server(app) as base:
        for path in ("/chat/completions", "/v1/chat/completions"):
            closed = engine.closed
            stream_a_few(base, 3, body={"messages": USER, "stream": True}, path=path)
            wait_until(lambda: engine.closed == closed + 1 and pool.stats()["busy"] == 0, what="the worker to be freed")
            assert engine.yielded < 200 * (closed + 1), "generation did not stop promptly"
        # non-streaming: the client gives up waiting for the reply
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/chat/completions", json={"messages": USER}, timeout=0.3)
        wait_until(lambda: engine.closed == 3 and pool.stats()["busy"] == 0, what="the worker to be freed")
        # the freed worker serves the next request normally
        engine.endless = False
        r = httpx.post(base + "/v1/chat/completions", json={"messages": USER}, timeout=10)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
        stats = httpx.get(base + "/stats").json()
    assert stats["cancelled"] == 3 and stats["served"] == 1 and stats["busy"] == 0


def test_queue_full_timeout_and_queued_disconnect(tokenizer):
    engine = FakeEngine(tokenizer, endless=True, delay=0.01)
    app = make_app(engine, tokenizer, max_queue=1, queue_timeout=1.0, max_tokens=2048, max_tokens_limit=4096)
    pool = app.state.pool

    async def scenario(base):
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            async def hold():  # occupies the only worker until cancelled
                async with client.stream("POST", "/chat/completions", json={"messages": USER}) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_lines():
                        pass
            holder = asyncio.ensure_future(hold())
            while pool.stats()["busy"] == 0:
                await asyncio.sleep(0.01)
            # one request may wait; it is dropped by its client while queued
            queued = asyncio.ensure_future(client.post("/v1/chat/completions", json={"messages": USER}))
            while pool.waiting == 0:
                await asyncio.sleep(0.01)
            r = await client.post("/v1/chat/completions", json={"messages": USER})  # the queue is full
            assert r.status_code == 429 and "--max-queue=1" in r.json()["error"]["message"]
            assert r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
            queued.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await queued
            while pool.waiting:
                await asyncio.sleep(0.01)
            # a request that waits longer than --queue-timeout gets a 503
            t0 = time.time()
            r = await client.post("/chat/completions", json={"messages": USER})
            assert r.status_code == 503 and "--queue-timeout" in r.json()["error"]["message"]
            assert 0.9 < time.time() - t0 < 5
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder

    with live_server(app) as base:
        asyncio.run(scenario(base))
        wait_until(lambda: pool.stats()["busy"] == 0, what="the worker to be freed")
        assert len(engine.calls) == 1, "the queued request whose client left must not run"
        engine.endless = False
        assert httpx.post(base + "/v1/chat/completions", json={"messages": USER}, timeout=10).status_code == 200
        stats = pool.stats()
    assert stats["refused"] == 2 and stats["queue"] == 0


# -----------------------------------------------------------------------------
# The official openai client, a real tiny model

def test_openai_client(tokenizer, tiny):
    import openai
    engine, _ = tiny
    app = make_app(engine, tokenizer, context_len=128)
    with live_server(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["nanochat-test"]
        out = client.chat.completions.create(model="nanochat-test", messages=[{"role": "user", "content": "Hi!"}],
                                             max_tokens=8, temperature=0.7, seed=1)
        assert out.object == "chat.completion" and isinstance(out.choices[0].message.content, str)
        assert out.choices[0].finish_reason in ("stop", "length")
        assert 1 <= out.usage.completion_tokens <= 8 and out.usage.prompt_tokens > 3
        chunks = list(client.chat.completions.create(model="nanochat-test", messages=[{"role": "user", "content": "Hi!"}],
                                                     max_tokens=8, temperature=0.7, seed=1, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == out.choices[0].message.content, "same seed, same reply, streamed or not"
        assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
        with pytest.raises(openai.BadRequestError, match="max-temperature"):
            client.chat.completions.create(model="nanochat-test", messages=[{"role": "user", "content": "Hi"}], temperature=5)


def test_openai_api_stop_n_logprobs_and_completions(tokenizer, tiny, monkeypatch):
    """The rest of the OpenAI surface, through the official client: stop strings (string or list, cut before
    the match, finish_reason "stop", streamed or not), n choices sampled together (choice i = the request
    with seed + i alone), logprobs / top_logprobs, usage, and POST /v1/completions for plain text."""
    import openai
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    engine, model = tiny
    app = make_app(engine, tokenizer, context_len=128, max_batch=4)
    msgs = [{"role": "user", "content": "Tell me a story"}]
    with live_server(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
        chat = client.chat.completions.create

        full = chat(model="m", messages=msgs, max_tokens=24, temperature=0).choices[0].message.content
        assert len(full) > 6
        cut = full[3:6]  # a stop string in the middle of the reply, likely spanning tokens
        for stop in (cut, [cut, "\u2603never"]):
            out = chat(model="m", messages=msgs, max_tokens=24, temperature=0, stop=stop)
            assert out.choices[0].message.content == full[:full.index(cut)]
            assert out.choices[0].finish_reason == "stop"
            chunks = list(chat(model="m", messages=msgs, max_tokens=24, temperature=0, stop=stop, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[:full.index(cut)]
            assert chunks[-1].choices[0].finish_reason == "stop"

        several = chat(model="m", messages=msgs, max_tokens=10, temperature=1.0, seed=7, n=3)
        assert [c.index for c in several.choices] == [0, 1, 2]
        texts = [c.message.content for c in several.choices]
        assert len(set(texts)) > 1, "different seeds per choice"
        alone_tokens = 0
        for i, text in enumerate(texts):
            alone = chat(model="m", messages=msgs, max_tokens=10, temperature=1.0, seed=7 + i)
            assert alone.choices[0].message.content == text
            alone_tokens += alone.usage.completion_tokens
        assert several.usage.completion_tokens == alone_tokens and several.usage.prompt_tokens == alone.usage.prompt_tokens
        streamed = {}
        for c in chat(model="m", messages=msgs, max_tokens=10, temperature=1.0, seed=7, n=3, stream=True):
            for choice in c.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + (choice.delta.content or "")
        assert [streamed[i] for i in range(3)] == texts

        out = chat(model="m", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
        content = out.choices[0].logprobs.content
        assert "".join(t.token for t in content) == out.choices[0].message.content
        prompt = tokenizer.render_for_completion({"messages": msgs})
        with torch.no_grad():
            for t in content:
                logp = torch.log_softmax(model(torch.tensor([prompt]))[0, -1].float(), -1)
                best = int(logp.argmax())
                assert tokenizer.id_to_token(best) == t.token and abs(t.logprob - float(logp[best])) < 1e-3
                assert [x.token for x in t.top_logprobs] == [tokenizer.id_to_token(i) for i in torch.topk(logp, 3).indices]
                prompt.append(best)

        text = client.completions.create(model="m", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
        assert text.object == "text_completion" and text.choices[0].finish_reason in ("stop", "length")
        lp = text.choices[0].logprobs
        assert "".join(lp.tokens) == text.choices[0].text and len(lp.top_logprobs[0]) == 2
        assert lp.text_offset[0] == 0 and text.usage.prompt_tokens == len(tokenizer.encode("Once upon a time")) + 1
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="m", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True))
        assert streamed == text.choices[0].text
        with pytest.raises(openai.BadRequestError, match="echo"):
            client.completions.create(model="m", prompt="x", echo=True)


def test_prometheus_metrics(tokenizer):
    """/metrics in Prometheus' text format, parsed with prometheus_client's own parser: the counts and
    histograms move with the traffic, the gauges read the pool."""
    from prometheus_client.parser import text_string_to_metric_families
    with client_for(FakeEngine(tokenizer, reply="one two three"), tokenizer, max_batch=2) as client:
        for _ in range(3):
            assert client.post("/v1/chat/completions", json={"messages": USER}).status_code == 200
        client.post("/v1/chat/completions", json={"messages": USER, "temperature": 99})
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(r.text) for s in family.samples}
    assert samples[("nanochat_requests_total", (("status", "200"),))] == 3
    assert samples[("nanochat_requests_total", (("status", "400"),))] == 1
    assert samples[("nanochat_time_to_first_token_seconds_count", ())] == 3
    assert samples[("nanochat_time_per_output_token_seconds_count", ())] == 3
    assert samples[("nanochat_output_tokens_total", ())] == 3 * (len(tokenizer.encode("one two three")) + 1)
    assert samples[("nanochat_queue_depth", ())] == 0 and samples[("nanochat_batch_occupancy", ())] == 0
    assert samples[("nanochat_tokens_per_second", ())] > 0
    assert ("nanochat_cached_tokens", ()) in samples


def test_real_engine_replies(tokenizer, tiny):
    engine, _ = tiny
    with client_for(engine, tokenizer, context_len=128) as client:
        body = {"messages": USER, "temperature": 0, "max_tokens": 12}
        a = client.post("/v1/chat/completions", json=body).json()
        events = [json.loads(d) for d in sse_data(client.post("/chat/completions", json=body).text)]
    text = "".join(e.get("token", "") for e in events)
    assert text == a["choices"][0]["message"]["content"], "greedy: streamed and non-streamed replies agree"
    assert events[-1]["done"] and events[-1]["completion_tokens"] == a["usage"]["completion_tokens"] <= 12


# -----------------------------------------------------------------------------
# The command line

def test_cli_flag_errors(capsys, monkeypatch, tmp_path):
    for argv, flag in ((["--temperature", "-1"], "--temperature"), (["--temperature", "3"], "--max-temperature"),
                       (["--top-k", "500"], "--max-top-k"), (["--max-tokens", "9999"], "--max-tokens-limit"),
                       (["--port", "70000"], "--port"), (["--queue-timeout", "0"], "--queue-timeout"),
                       (["--device-type", "cpu", "--num-gpus", "2"], "--num-gpus"), (["--bogus"], "--bogus")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and flag in capsys.readouterr().err, argv
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["-i", "sft", "--device-type", "cpu"])
    assert e.value.code == 1 and "no sft checkpoint" in capsys.readouterr().err
    assert "--max-queue" in get_parser().format_help()


def test_cli_serves_a_checkpoint(tokenizer, tmp_path):
    """python -m scripts.chat_web against a tiny sft checkpoint in a private base dir."""
    from nanochat.checkpoint import save_checkpoint
    model = tiny_model(tokenizer, sequence_len=64)
    tokenizer.save(str(tmp_path / "tokenizer"))
    save_checkpoint(str(tmp_path / "sft_checkpoints" / "d2"), 5, model.state_dict(), None,
                    {"model_config": asdict(model.config)})
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--port", "0", "--device-type", "cpu",
                             "--max-tokens", "6"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, port = [], None
        deadline = time.time() + 60
        while port is None:
            line = proc.stdout.readline()
            assert line and time.time() < deadline, "server did not start:\n" + "".join(output)
            output.append(line)
            if m := re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health").json()["model"] == "nanochat-sft-d2-step5"
        r = httpx.post(base + "/v1/chat/completions", json={"messages": USER}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 6
    finally:
        proc.terminate()
        rest = proc.communicate(timeout=20)[0]
    log = "".join(output) + rest
    assert re.search(r"POST /v1/chat/completions 200 .*prompt_tokens=\d+ .*completion_tokens=\d+", log), log


# -----------------------------------------------------------------------------
# Load: 50 concurrent streaming clients against a CPU tiny model

def test_concurrent_requests_are_batched_and_each_reply_is_its_own(tokenizer, tiny, monkeypatch):
    """Eight greedy requests at once on a replica with --max-batch 4: the worker decodes them together (up
    to 4 active), and each reply is exactly what the request gets alone (fp32), whatever its neighbours."""
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    engine, _ = tiny
    questions = [f"Tell me about {topic}" for topic in ("the sea", "a cat", "rain on a tin roof", "bread", "numbers 1 2 3",
                                                          "winter", "a very long and winding road through the hills", "x")]

    def body(q, n):
        return {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": n}

    app = make_app(engine, tokenizer, context_len=128, max_batch=4)
    worker = app.state.pool.workers[0]
    peak = []
    step = worker.make_scheduler

    def spying_scheduler():
        scheduler = step()
        original = scheduler.step

        def spy():
            peak.append(len(scheduler.active) + len(scheduler.waiting))
            return original()
        scheduler.step = spy
        return scheduler
    worker.make_scheduler = spying_scheduler
    worker.scheduler = spying_scheduler()

    async def ask_all(base):
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            replies = await asyncio.gather(*(client.post("/v1/chat/completions", json=body(q, 6 + 3 * i))
                                             for i, q in enumerate(questions)))
        return [r.json()["choices"][0]["message"]["content"] for r in replies]

    with live_server(app) as base:
        together = asyncio.run(ask_all(base))
    assert max(peak) >= 4, peak
    alone_app = make_app(engine, tokenizer, context_len=128, max_batch=1)
    with client_for_app(alone_app) as client:
        for i, (q, reply) in enumerate(zip(questions, together)):
            r = client.post("/v1/chat/completions", json=body(q, 6 + 3 * i))
            assert r.json()["choices"][0]["message"]["content"] == reply, q


def test_load_50_streaming_clients(tokenizer, tiny):
    psutil = pytest.importorskip("psutil")
    engine, _ = tiny
    app = make_app(engine, tokenizer, context_len=128, max_batch=4, max_tokens=8, max_queue=20, queue_timeout=10)
    pool = app.state.pool
    outcomes = {"done": 0, "refused": 0, "dropped": 0}

    async def one(client, i):
        async with client.stream("POST", "/chat/completions", json={"messages": [{"role": "user", "content": f"hi {i}"}]}) as r:
            if r.status_code in (429, 503):
                body = json.loads(await r.aread())
                assert body["error"]["code"] in ("queue_full", "queue_timeout") and body["error"]["message"]
                outcomes["refused"] += 1
                return
            assert r.status_code == 200, r.status_code
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                assert "error" not in event, event
                if i % 5 == 0:  # every fifth client walks away after its first event
                    outcomes["dropped"] += 1
                    return
                if event.get("done"):
                    outcomes["done"] += 1
                    return
            raise AssertionError("stream ended without a done event")

    async def round_(base):
        limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
            await asyncio.gather(*(one(client, i) for i in range(50)))

    proc = psutil.Process()
    with live_server(app) as base:
        asyncio.run(round_(base))  # warm-up: allocator pools, thread stacks, caches
        gc.collect()
        rss0, threads0 = proc.memory_info().rss, threading.active_count()
        t0, rounds = time.time(), 0
        while time.time() - t0 < 8 or rounds < 2:
            asyncio.run(round_(base))
            rounds += 1
        wait_until(lambda: pool.stats()["busy"] == 0 and pool.stats()["queue"] == 0, what="the server to go idle")
        gc.collect()
        grown = (proc.memory_info().rss - rss0) / 2**20
        stats = httpx.get(base + "/stats").json()
        assert not pool.jobs and threading.active_count() == threads0, "jobs or threads left behind"
    total = 50 * (rounds + 1)
    assert sum(outcomes.values()) == total, outcomes
    assert outcomes["done"] > 0 and outcomes["dropped"] > 0
    assert stats["served"] + stats["cancelled"] + stats["refused"] == stats["requests"] == total
    assert grown < 50, f"memory grew {grown:.1f} MB over {rounds} rounds of 50 clients"
    print(f"load: {rounds + 1} rounds x 50 clients: {outcomes}, RSS +{grown:.1f} MB, "
          f"{stats['tokens_per_second']} tok/s while generating")


# -----------------------------------------------------------------------------
# A real browser: Debian's chromium driven by Playwright

def test_browser_chat(tokenizer, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    engine = FakeEngine(tokenizer, delay=0.03)
    app = make_app(engine, tokenizer, max_message_chars=300, max_tokens=4096, max_tokens_limit=4096)
    os.makedirs(ARTIFACTS, exist_ok=True)
    external = []

    def route(r):
        if r.request.url.startswith(base):
            r.continue_()
        else:
            external.append(r.request.url)
            r.abort()

    with live_server(app) as base, sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
                                                   args=CHROMIUM_FLAGS, viewport={"width": 1200, "height": 800})
        try:
            ctx.route("**/*", route)
            page = ctx.new_page()
            page.set_default_timeout(15000)
            page.goto(base + "/")
            sync_api.expect(page.locator("#settings")).to_contain_text("temperature 0.8")  # defaults from /health

            def reply_text(i=-1):
                return page.locator(".msg.assistant .content").nth(i).inner_text()

            def wait_idle():
                page.wait_for_selector("body[data-busy=false]")

            # type and send with Enter; the reply streams in (slowly this once, to catch it half-way)
            engine.delay = 0.1
            page.fill("#input", "Hello there")
            page.press("#input", "Enter")
            partial = page.wait_for_selector(".msg.assistant.streaming .content:not(:empty)").inner_text()
            wait_idle()
            assert reply_text() == "echo: Hello there #1 t=0.8 k=50"
            assert partial and len(partial) < len(reply_text()) and reply_text().startswith(partial)
            engine.delay = 0.02

            # Shift+Enter adds a line, Enter sends
            page.click("#input")
            page.keyboard.type("line one")
            page.keyboard.press("Shift+Enter")
            page.keyboard.type("line two")
            assert page.input_value("#input") == "line one\nline two"
            page.keyboard.press("Enter")
            wait_idle()
            assert page.locator(".msg.user .content").nth(1).inner_text() == "line one\nline two"
            assert page.locator(".msg").count() == 4

            # edit the first user message: the rest of the conversation is discarded and regenerated
            page.click(".msg.user >> nth=0 >> .edit")
            page.fill(".edit-box", "Edited question")
            page.click(".msg.user .save")
            wait_idle()
            assert page.locator(".msg").count() == 2
            assert page.locator(".msg.user .content").inner_text() == "Edited question"
            assert reply_text() == "echo: Edited question #3 t=0.8 k=50"

            # regenerate the reply
            page.click(".msg.assistant .regen")
            wait_idle()
            assert page.locator(".msg").count() == 2 and reply_text() == "echo: Edited question #4 t=0.8 k=50"

            # slash commands: set and show, nothing is sent
            for command in ("/temperature 0.3", "/topk 7", "/temperature"):
                page.fill("#input", command)
                page.press("#input", "Enter")
            assert page.inner_text("#settings") == "temperature 0.3 \u00b7 top-k 7"
            notices = page.locator(".notice").all_inner_texts()
            assert notices == ["temperature set to 0.3", "top-k set to 7", "temperature is 0.3"]
            assert len(engine.calls) == 4
            page.fill("#input", "/temperature 99")
            page.press("#input", "Enter")
            assert page.is_visible("#error") and "/temperature takes a number" in page.inner_text("#error")
            page.fill("#input", "And now?")
            page.press("#input", "Enter")
            wait_idle()
            assert reply_text() == "echo: And now? #5 t=0.3 k=7"
            page.screenshot(path=os.path.join(ARTIFACTS, "chat_web_desktop.png"))

            # the server refuses: a visible error naming the limit
            page.fill("#input", "x" * 301)
            page.press("#input", "Enter")
            page.wait_for_selector("#error:not([hidden])")
            assert "--max-message-chars=300" in page.inner_text("#error")
            assert page.locator(".msg.user .retry").count() == 1
            page.screenshot(path=os.path.join(ARTIFACTS, "chat_web_error.png"))

            # Stop while streaming frees the server's worker
            engine.endless = True
            page.click(".msg.user >> nth=-1 >> .edit")
            page.fill(".edit-box", "Go on forever")
            page.press(".edit-box", "Enter")
            streaming = page.locator(".msg.assistant.streaming .content")
            wait_until(lambda: streaming.count() and len(streaming.inner_text()) > 20, what="a long streamed reply")
            assert page.inner_text("#send") == "Stop"
            page.click("#send")
            wait_idle()
            assert "(stopped)" in page.inner_text(".msg.assistant >> nth=-1")
            wait_until(lambda: app.state.pool.stats()["busy"] == 0, what="the worker to be freed after Stop")
            engine.endless = False

            # phone-sized screen: nothing overflows sideways
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(100)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            composer = page.locator("#composer").bounding_box()
            assert composer["y"] + composer["height"] <= 844 and composer["width"] <= 390
            page.screenshot(path=os.path.join(ARTIFACTS, "chat_web_phone.png"))

            # new conversation
            page.click("#new-chat")
            assert page.locator(".msg").count() == 0 and page.is_visible("#empty")
            page.screenshot(path=os.path.join(ARTIFACTS, "chat_web_phone_empty.png"))
        finally:
            ctx.close()
    assert not external, f"the page tried to reach outside the server: {external}"


def test_worker_pauses_after_first_tokens_only_before_a_decode_forward(monkeypatch, tokenizer):
    """New requests' first tokens go to the event loop at once; the worker then pauses FIRST_TOKEN_PAUSE (so
    the loop can send them) only when the step goes on to decode other rows, not for a batch of new ones."""
    import types
    from nanochat import workers
    slept, sent = [], []
    monkeypatch.setattr(workers.time, "sleep", slept.append)
    scheduler = types.SimpleNamespace(max_batch=4, active=[], on_first_tokens=None)
    worker = Worker(lambda: scheduler, tokenizer)
    worker._attach(scheduler)
    class Loop:  # the event loop's side of flush(): what one step sends
        def call_soon_threadsafe(self, fn, items):
            sent.append(items)
    loop = Loop()
    jobs = [types.SimpleNamespace(loop=loop, generated=0, first_token_at=None, put=None) for _ in range(3)]
    for i, job in enumerate(jobs):
        job.put = lambda kind, value=None, job=job: worker.outbox.append((job, (kind, value)))
        worker.jobs[f"r{i}"] = job
    event = lambda r: types.SimpleNamespace(request=r, token=7)
    scheduler.active = ["r0", "r1"]  # two new requests, nothing else to decode: no pause
    scheduler.on_first_tokens([event("r0"), event("r1")])
    assert slept == [] and len(sent) == 1 and [j.generated for j in jobs] == [1, 1, 0]
    scheduler.active = ["r0", "r1", "r2"]  # one new request joins two running ones: sent, then the pause
    scheduler.on_first_tokens([event("r2")])
    assert slept == [workers.FIRST_TOKEN_PAUSE] and len(sent) == 2 and jobs[2].first_token_at is not None
