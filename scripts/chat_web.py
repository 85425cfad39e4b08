"""
Web chat: a ChatGPT-like page and an OpenAI-compatible API in front of a pool of model replicas.

python -m scripts.chat_web -i sft --port 8000 --host 127.0.0.1
python -m scripts.chat_web -i sft --num-gpus 8 --host 0.0.0.0 --max-queue 64

Endpoints
    GET  /                      the chat page (nanochat/ui.html: one file, no build step, nothing external)
    POST /chat/completions      the page's endpoint: server-sent events {"token": ...}, then {"done": true, ...}
    POST /v1/chat/completions   OpenAI chat completions (messages, temperature, top_p, max_tokens, stream, n=1,
                                seed, stream_options.include_usage); nanochat extension: top_k
    GET  /v1/models             OpenAI model list (one model)
    GET  /health, GET /stats    liveness, defaults and limits; worker, queue and throughput counters

One worker per GPU (or one on CPU) holds a model replica. Requests wait in a bounded FIFO queue for a
free worker; each generation runs in its worker's thread, so the event loop stays responsive, and
checks a cancellation flag between tokens, so a client that goes away frees its worker at once.
Bad input gets a 4xx JSON error in OpenAI's shape ({"error": {"message", "type", "param", "code"}})
whose message names the limit's flag. Unknown top-level fields are ignored (OpenAI clients send
many); known ones are validated. Every request logs one line to stdout.
"""
import asyncio
import json
import os
import secrets
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch

from nanochat.common import autocast_context, get_compute_dtype, make_parser, non_negative_float, non_negative_int, positive_float, positive_int, str2bool

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")


@dataclass
class ServeConfig:
    # generation defaults, used when a request does not set them
    temperature: float = 0.8
    top_k: int = 50  # 0 = no top-k filter
    max_tokens: int = 512
    # limits: a request outside them gets a 4xx error naming the flag (--max-messages, ...)
    max_messages: int = 200
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_temperature: float = 2.0
    max_top_k: int = 200
    max_tokens_limit: int = 2048
    max_body_bytes: int = 1_000_000
    max_queue: int = 32  # requests waiting for a worker; more get 429
    queue_timeout: float = 60.0  # seconds a request may wait for a worker before a 503


# -----------------------------------------------------------------------------
# Streaming decode: text pieces that never split a UTF-8 character

class StreamDecoder:
    """Turns token ids, pushed one at a time, into text pieces whose concatenation is exactly
    tokenizer.decode(all ids). A character whose bytes straddle tokens is held back until complete:
    ids since the last clean cut are decoded together and a trailing U+FFFD (an incomplete sequence,
    or an invalid one only the next bytes can tell apart) is not emitted yet. Uses only decode(ids)."""

    def __init__(self, tokenizer, max_window=64):
        self.tokenizer = tokenizer
        self.max_window = max_window  # give up waiting (invalid bytes) after this many tokens
        self.window = []  # ids since the last clean cut
        self.emitted = 0  # characters of decode(window) already returned

    def push(self, token_id):
        self.window.append(token_id)
        text = self.tokenizer.decode(self.window)
        complete = len(text.rstrip("\ufffd"))
        if complete == len(text) or len(self.window) >= self.max_window:
            piece = text[self.emitted:]
            self.window, self.emitted = [], 0
            return piece
        piece = text[self.emitted:complete]
        self.emitted = max(self.emitted, complete)
        return piece

    def flush(self):
        """Whatever is held back (undecodable bytes become U+FFFD)."""
        piece = self.tokenizer.decode(self.window)[self.emitted:] if self.window else ""
        self.window, self.emitted = [], 0
        return piece


# -----------------------------------------------------------------------------
# Request validation

class RequestError(Exception):
    """Becomes a JSON error response: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, code, param=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers

    def response_body(self):
        kind = {429: "rate_limit_error", 503: "server_overloaded"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list
    chars: int
    temperature: float
    top_k: int
    top_p: float
    max_tokens: int
    stream: bool
    include_usage: bool
    seed: int
    model: str


def _bad(message, param, code="invalid_value"):
    return RequestError(400, message, code, param)


def _number(body, name, default, lo, hi, flag=None, integer=False, low_open=False):
    """A numeric field in [lo, hi] (or (lo, hi] when low_open); None or absent -> default."""
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _bad(f"'{name}' must be {kind}, got {json.dumps(value)[:40]}", name, "invalid_type")
    ok = (lo < value if low_open else lo <= value) and value <= hi  # also false for nan
    if not ok:
        where = f"({lo}, {hi}]" if low_open else f"[{lo}, {hi}]"
        limit = f" (server limit {flag}={hi})" if flag else ""
        raise _bad(f"'{name}' must be in {where}, got {value}{limit}", name)
    return value


def _content_text(content, i):
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                           f"messages[{i}].content", "unsupported_content")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content", "invalid_type")


def parse_messages(messages, config):
    """Validated [{"role", "content"}]: an optional leading system (or developer) message, then user and
    assistant alternating, starting and ending with user. Returns (messages, total characters)."""
    if messages is None:
        raise _bad("'messages' is required: a list of {\"role\", \"content\"} objects", "messages", "missing_field")
    if not isinstance(messages, list):
        raise _bad("'messages' must be a list of {\"role\", \"content\"} objects", "messages", "invalid_type")
    if not messages:
        raise _bad("'messages' is empty: send at least one user message", "messages", "empty_messages")
    if len(messages) > config.max_messages:
        raise _bad(f"too many messages: {len(messages)} (server limit --max-messages={config.max_messages})",
                   "messages", "too_many_messages")
    out, total = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system message
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {json.dumps(role)[:40]}",
                       f"messages[{i}].role", "invalid_role")
        text = _content_text(m.get("content"), i)
        if len(text) > config.max_message_chars:
            raise _bad(f"messages[{i}] has {len(text)} characters (server limit --max-message-chars={config.max_message_chars})",
                       f"messages[{i}].content", "message_too_long")
        total += len(text)
        out.append({"role": role, "content": text})
    if total > config.max_total_chars:
        raise _bad(f"the messages have {total} characters in total (server limit --max-total-chars={config.max_total_chars})",
                   "messages", "conversation_too_long")
    start = 1 if out[0]["role"] == "system" else 0
    for k, m in enumerate(out[start:]):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise _bad(f"messages[{start + k}] has role '{m['role']}', expected '{expected}': after an optional leading "
                       "system message, roles alternate user/assistant starting with user", f"messages[{start + k}].role", "invalid_role")
    if len(out) == start or out[-1]["role"] != "user":
        raise _bad("the last message must have role 'user'", "messages", "invalid_role")
    return out, total


def parse_request(raw, config, default_stream=False):
    """Request body bytes -> ChatRequest, or RequestError naming the problem."""
    if not raw or not raw.strip():
        raise RequestError(400, "empty request body: expected a JSON object with a 'messages' list", "empty_body")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8 JSON", "malformed_json") from None
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply", "malformed_json") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise RequestError(400, f"malformed JSON: {e}", "malformed_json") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(body).__name__}", "invalid_type")
    messages, chars = parse_messages(body.get("messages"), config)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad(f"'n' must be 1 (one reply per request), got {json.dumps(n)[:40]}", "n", "unsupported_value")
    stream = body.get("stream", default_stream)
    stream = default_stream if stream is None else stream
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream", "invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("'stream_options.include_usage' must be true or false", "stream_options", "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _bad("give 'max_tokens' or 'max_completion_tokens', not both", "max_tokens")
    tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    seed = _number(body, "seed", None, -2**63, 2**63 - 1, integer=True)
    return ChatRequest(
        messages=messages, chars=chars,
        temperature=float(_number(body, "temperature", config.temperature, 0.0, config.max_temperature, "--max-temperature")),
        top_k=_number(body, "top_k", config.top_k, 0, config.max_top_k, "--max-top-k", integer=True),
        top_p=float(_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)),
        max_tokens=_number(body, tokens_field, config.max_tokens, 1, config.max_tokens_limit, "--max-tokens-limit", integer=True),
        stream=stream, include_usage=include_usage,
        seed=secrets.randbits(31) if seed is None else seed % 2**31,  # fresh per request: regenerate gives a new reply
        model=model or "",
    )


# -----------------------------------------------------------------------------
# Workers: one model replica each, generating in their own thread

class Worker:
    """An engine (with .generate(tokens, num_samples, max_tokens, temperature, top_k, top_p, seed)), its
    tokenizer and device. context_len (the model's sequence length) bounds prompt + reply."""

    def __init__(self, engine, tokenizer, device="cpu", name=None, context_len=None):
        self.engine, self.tokenizer = engine, tokenizer
        self.device = torch.device(device)
        self.name = name or str(self.device)
        self.context_len = context_len
        self.stop_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"chat-worker-{self.name}")
        self.served = 0

    @contextmanager
    def context(self):
        """Device, mixed precision and no-grad for a generation; entered in the worker's thread."""
        device_type = self.device.type
        on_device = torch.cuda.device(self.device) if device_type == "cuda" else nullcontext()
        with on_device, torch.no_grad(), autocast_context(device_type, get_compute_dtype(device_type)):
            yield


class Job:
    """One generation. The worker thread puts ("token", id), then ("end", finish_reason) or ("error", exc),
    and always ("closed", None) last, on an asyncio queue the request handler reads."""

    def __init__(self, pool, worker, prompt, request, loop):
        self.pool, self.worker, self.prompt, self.request, self.loop = pool, worker, prompt, request, loop
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()
        self.completion_tokens = 0  # tokens handed to the request (consumer side)
        self.finish_reason = None  # "stop" / "length" once the consumer saw the end, "error" if it failed
        self.outcome = None  # the thread's view: "stop", "length", "cancelled" or "error"

    def cancel(self):
        self.cancelled.set()

    def _put(self, kind, value=None):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()

    def run(self):
        """In the worker's thread. Stops between tokens once cancelled; always gives the worker back."""
        r, worker = self.request, self.worker
        t0, generated, gen = time.perf_counter(), 0, None
        try:
            with worker.context():
                gen = worker.engine.generate(self.prompt, num_samples=1, max_tokens=r.max_tokens, temperature=r.temperature,
                                             top_k=r.top_k or None, top_p=r.top_p if r.top_p < 1.0 else None, seed=r.seed)
                finish = "length"
                for column, _masks in gen:
                    if self.cancelled.is_set():
                        finish = None
                        break
                    token = int(column[0])
                    generated += 1
                    if token in worker.stop_tokens:
                        finish = "stop"
                        break
                    self._put("token", token)
                if finish:
                    self._put("end", finish)
                self.outcome = finish or "cancelled"
        except Exception as e:
            self.outcome = "error"
            self._put("error", e)
        finally:
            try:
                if gen is not None:
                    gen.close()  # the engine's cleanup (KV cache) runs now, not at garbage collection
            except Exception:
                pass  # nothing to report to: the request already has its end or error
            self._put("closed")
            seconds = time.perf_counter() - t0
            try:
                self.loop.call_soon_threadsafe(self.pool.release, self, generated, seconds)
            except RuntimeError:
                pass

    async def tokens(self):
        """Token ids as they come; sets finish_reason; raises RuntimeError if generation failed."""
        while True:
            kind, value = await self.events.get()
            if kind == "token":
                self.completion_tokens += 1
                yield value
            elif kind == "end":
                self.finish_reason = value
            elif kind == "error":
                self.finish_reason = "error"
                raise RuntimeError(f"generation failed: {type(value).__name__}: {value}")
            else:  # closed
                return


class PoolFull(Exception):
    pass


class WorkerPool:
    """Free workers in an asyncio queue: requests wait (FIFO, at most max_queue of them) for one."""

    def __init__(self, workers, max_queue=32, window=60.0):
        if not workers:
            raise ValueError("a worker pool needs at least one worker")
        self.workers, self.max_queue, self.window = list(workers), max_queue, window
        self.tokenizer = self.workers[0].tokenizer
        self.context_len = min((w.context_len for w in self.workers if w.context_len), default=None)
        self.free = None  # asyncio.Queue, made by start() inside the server's event loop
        self.jobs = set()
        self.waiting = 0
        self.counts = dict(requests=0, served=0, cancelled=0, rejected=0, refused=0, failed=0)
        self.tokens, self.busy_seconds = 0, 0.0
        self.recent = deque()  # (time, tokens) of finished generations within `window` seconds
        self.started_at = time.time()

    def start(self):
        self.free = asyncio.Queue()
        for w in self.workers:
            self.free.put_nowait(w)

    def stop(self):
        for job in list(self.jobs):
            job.cancel()

    @property
    def busy(self):
        return len(self.workers) - self.free.qsize()

    def acquire(self):
        """A task that resolves to a free worker (FIFO); raises PoolFull at once when the queue is full."""
        if self.free.empty() and self.waiting >= self.max_queue:
            raise PoolFull()
        self.waiting += 1
        task = asyncio.ensure_future(self.free.get())
        task.add_done_callback(self._done_waiting)
        return task

    def _done_waiting(self, task):
        self.waiting -= 1

    def submit(self, worker, prompt, request):
        job = Job(self, worker, prompt, request, asyncio.get_running_loop())
        self.jobs.add(job)
        worker.executor.submit(job.run)
        return job

    def release(self, job, tokens, seconds):
        """On the event loop, when a job's thread is done."""
        self.jobs.discard(job)
        if job.outcome in ("stop", "length"):
            job.worker.served += 1
            self.counts["served"] += 1
        else:
            self.counts["cancelled" if job.outcome == "cancelled" else "failed"] += 1
        self.tokens += tokens
        self.busy_seconds += seconds
        now = time.time()
        self.recent.append((now, tokens))
        self._prune(now)
        self.free.put_nowait(job.worker)

    def _prune(self, now):
        while self.recent and self.recent[0][0] < now - self.window:
            self.recent.popleft()

    def stats(self):
        now = time.time()
        self._prune(now)
        span = min(self.window, max(now - self.started_at, 1e-9))
        busy_workers = {id(j.worker) for j in self.jobs}
        return dict(
            workers=len(self.workers), busy=self.busy, queue=self.waiting, max_queue=self.max_queue,
            **self.counts, tokens=self.tokens,
            tokens_per_second=round(self.tokens / self.busy_seconds, 2) if self.busy_seconds else 0.0,
            recent_tokens_per_second=round(sum(t for _, t in self.recent) / span, 2),
            uptime_seconds=round(now - self.started_at, 1),
            worker_list=[dict(name=w.name, device=str(w.device), busy=id(w) in busy_workers, served=w.served)
                         for w in self.workers],
        )


# -----------------------------------------------------------------------------
# The app

def error_response(err):
    from fastapi.responses import JSONResponse
    return JSONResponse(err.response_body(), status_code=err.status, headers=err.headers)


async def read_body(request, limit):
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, f"request body is {length} bytes (server limit --max-body-bytes={limit})", "body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over {limit} bytes (server limit --max-body-bytes={limit})", "body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_for_disconnect(request):
    """Returns when the client has gone (after the body was read, receive() only reports that)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a server that cannot tell: treat as gone only if it says so
        await asyncio.Event().wait()


class RequestLog:
    """Collects one request's facts and prints them as one line, once."""

    def __init__(self, request):
        self.t0 = time.perf_counter()
        self.fields = dict(method=request.method, path=request.url.path,
                           client=request.client.host if request.client else "-")
        self.done = False

    def emit(self, status, **fields):
        if self.done:
            return
        self.done = True
        f = dict(self.fields, **fields)
        secs = time.perf_counter() - self.t0
        parts = [time.strftime("%Y-%m-%dT%H:%M:%S"), f.pop("method"), f.pop("path"), str(status), f"{secs:.3f}s"]
        completion = f.get("completion_tokens")
        if completion:
            parts.append(f"{completion / secs:.1f}tok/s")
        parts += [f"{k}={v}" for k, v in f.items() if v is not None]
        print(" ".join(parts), flush=True)


def create_app(pool, config=None, model_id="nanochat"):
    """The FastAPI app over a WorkerPool. config: ServeConfig (defaults and limits)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    config = config or ServeConfig()
    with open(UI_PATH, encoding="utf-8") as f:
        page = f.read()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield
        pool.stop()

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool, app.state.config = pool, config

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404, 405 in the same JSON shape as ours
        return JSONResponse({"error": {"message": str(exc.detail), "type": "invalid_request_error", "param": None,
                                       "code": str(exc.status_code)}}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return JSONResponse({"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                       "code": "invalid_request"}}, status_code=400)

    class EventStream(StreamingResponse):
        """Server-sent events; however the response ends (done, client gone, error), the generation
        is cancelled and the request logged."""
        media_type = "text/event-stream"

        def __init__(self, content, job, log):
            super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.job, self.log = job, log

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                if self.job.finish_reason is None:
                    self.job.cancel()
                self.log.emit(200, completion_tokens=self.job.completion_tokens,
                              finish=self.job.finish_reason or "cancelled", worker=self.job.worker.name)

    @app.get("/")
    async def index():
        csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:"
        return HTMLResponse(page, headers={"Content-Security-Policy": csp, "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "workers": len(pool.workers), "busy": pool.busy, "queue": pool.waiting,
                "context_len": pool.context_len,
                "defaults": {"temperature": config.temperature, "top_k": config.top_k, "max_tokens": config.max_tokens},
                "limits": {k: v for k, v in asdict(config).items() if k.startswith("max_") and k != "max_tokens"}
                | {"queue_timeout": config.queue_timeout}}

    @app.get("/stats")
    async def stats():
        return pool.stats()

    def model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "nanochat"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            return error_response(RequestError(404, f"model '{name}' does not exist; this server has '{model_id}'",
                                               "model_not_found", "model"))
        return model_card()

    async def start_job(request, log, default_stream):
        """Read, validate, encode, queue: (ChatRequest, prompt ids, Job); a RequestError, or None if the client left."""
        try:
            raw = await read_body(request, config.max_body_bytes)
        except ClientDisconnect:
            return None
        req = parse_request(raw, config, default_stream)
        log.fields.update(stream=int(req.stream), messages=len(req.messages), chars=req.chars)
        try:
            prompt = pool.tokenizer.render_for_completion({"messages": req.messages})
        except ValueError as e:
            raise _bad(f"cannot render the conversation: {e}", "messages")
        log.fields["prompt_tokens"] = len(prompt)
        if pool.context_len:
            room = pool.context_len - len(prompt)
            if room < 1:
                raise _bad(f"the conversation is {len(prompt)} tokens; the model's context is {pool.context_len} tokens: "
                           "start a new conversation or shorten it", "messages", "context_length_exceeded")
            req.max_tokens = min(req.max_tokens, room)
        # wait for a worker, unless the queue is full, the wait is too long, or the client leaves meanwhile
        try:
            acquiring = pool.acquire()
        except PoolFull:
            raise RequestError(429, f"the server is busy: {pool.waiting} requests are already waiting for a worker "
                                    f"(server limit --max-queue={pool.max_queue}); retry later", "queue_full",
                               headers={"Retry-After": "5"}) from None
        gone = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            done, _ = await asyncio.wait({acquiring, gone}, timeout=config.queue_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if acquiring not in done:
            acquiring.cancel()
            if gone in done:
                return None
            raise RequestError(503, f"no worker became free within {config.queue_timeout:g}s (server limit --queue-timeout); "
                                    "the server is busy, retry later", "queue_timeout", headers={"Retry-After": "5"})
        worker = acquiring.result()
        if gone in done:
            pool.free.put_nowait(worker)
            return None
        return req, prompt, pool.submit(worker, prompt, req)

    async def chat(request, openai_format):
        log = RequestLog(request)
        pool.counts["requests"] += 1
        try:
            started = await start_job(request, log, default_stream=not openai_format)
        except RequestError as e:
            pool.counts["refused" if e.status in (429, 503) else "rejected"] += 1
            log.emit(e.status, error=e.code)
            return error_response(e)
        if started is None:
            pool.counts["cancelled"] += 1
            log.emit(499, error="client_gone")
            return Response(status_code=499)
        req, prompt, job = started
        log.fields["seed"] = req.seed
        if req.stream:
            body = openai_events(req, prompt, job) if openai_format else page_events(prompt, job)
            return EventStream(body, job, log)
        # not streaming: collect the reply, cancelling if the client leaves meanwhile
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        watcher.add_done_callback(lambda t: t.cancelled() or job.cancel())
        try:
            text = await collect(job)
        except RuntimeError as e:
            log.emit(500, error="generation_failed", worker=job.worker.name)
            return JSONResponse({"error": {"message": str(e), "type": "server_error", "param": None, "code": "generation_failed"}},
                                status_code=500)
        finally:
            watcher.cancel()
        if job.finish_reason is None:  # cancelled: the client is gone
            log.emit(499, completion_tokens=job.completion_tokens, error="client_gone", worker=job.worker.name)
            return Response(status_code=499)
        log.emit(200, completion_tokens=job.completion_tokens, finish=job.finish_reason, worker=job.worker.name)
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": job.finish_reason}],
                "usage": usage(prompt, job)}

    async def collect(job):
        decoder, pieces = StreamDecoder(pool.tokenizer), []
        async for token in job.tokens():
            pieces.append(decoder.push(token))
        pieces.append(decoder.flush())
        return "".join(pieces)

    def usage(prompt, job):
        return {"prompt_tokens": len(prompt), "completion_tokens": job.completion_tokens,
                "total_tokens": len(prompt) + job.completion_tokens}

    def sse(obj):
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def page_events(prompt, job):
        decoder = StreamDecoder(pool.tokenizer)
        try:
            async for token in job.tokens():
                piece = decoder.push(token)
                if piece:
                    yield sse({"token": piece})
            piece = decoder.flush()
            if piece:
                yield sse({"token": piece})
            yield sse({"done": True, "finish_reason": job.finish_reason, **usage(prompt, job)})
        except RuntimeError as e:
            yield sse({"error": str(e)})

    async def openai_events(req, prompt, job):
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model_id, "system_fingerprint": None}

        def chunk(delta, finish=None):
            return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        decoder = StreamDecoder(pool.tokenizer)
        try:
            yield chunk({"role": "assistant", "content": ""})
            async for token in job.tokens():
                piece = decoder.push(token)
                if piece:
                    yield chunk({"content": piece})
            piece = decoder.flush()
            if piece:
                yield chunk({"content": piece})
            yield chunk({}, job.finish_reason)
            if req.include_usage:
                yield sse({**head, "choices": [], "usage": usage(prompt, job)})
        except RuntimeError as e:
            yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": "generation_failed"}})
        yield "data: [DONE]\n\n"

    @app.post("/chat/completions")
    async def page_chat(request: Request):
        return await chat(request, openai_format=False)

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request):
        return await chat(request, openai_format=True)

    return app


# -----------------------------------------------------------------------------
# Command line

def port_number(value):
    import argparse
    n = non_negative_int(value)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {value!r}")
    return n


def get_parser():
    d = ServeConfig()
    p = make_parser(__doc__)
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint family")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (e.g. d20); default the largest")
    p.add_argument("-s", "--step", type=non_negative_int, default=None, help="checkpoint step; default the last")
    p.add_argument("--device-type", choices=["cuda", "mps", "cpu"], default=None, help="default: autodetect")
    p.add_argument("--compile", type=str2bool, default=False,
                   help="compile the decode step (Engine(compile=True): faster tokens after a one-off compilation per batch shape; weights frozen)")
    p.add_argument("--num-gpus", type=positive_int, default=1, help="model replicas, one per GPU (CUDA only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    p.add_argument("--temperature", type=non_negative_float, default=d.temperature, help="default sampling temperature")
    p.add_argument("--top-k", type=non_negative_int, default=d.top_k, help="default top-k (0 = off)")
    p.add_argument("--max-tokens", type=positive_int, default=d.max_tokens, help="default reply length limit in tokens")
    g = p.add_argument_group("limits (requests outside them get a 4xx error naming the flag)")
    g.add_argument("--max-messages", type=positive_int, default=d.max_messages, help="messages per request")
    g.add_argument("--max-message-chars", type=positive_int, default=d.max_message_chars, help="characters per message")
    g.add_argument("--max-total-chars", type=positive_int, default=d.max_total_chars, help="characters per request")
    g.add_argument("--max-temperature", type=non_negative_float, default=d.max_temperature, help="highest temperature")
    g.add_argument("--max-top-k", type=non_negative_int, default=d.max_top_k, help="highest top-k")
    g.add_argument("--max-tokens-limit", type=positive_int, default=d.max_tokens_limit, help="highest max_tokens")
    g.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes, help="request body size")
    g.add_argument("--max-queue", type=non_negative_int, default=d.max_queue,
                   help="requests waiting for a worker; more get 429")
    g.add_argument("--queue-timeout", type=positive_float, default=d.queue_timeout,
                   help="seconds a request may wait for a worker before a 503")
    return p


def config_from_args(args, parser):
    config = ServeConfig(**{f: getattr(args, f) for f in ServeConfig.__dataclass_fields__})
    if config.temperature > config.max_temperature:
        parser.error(f"--temperature {config.temperature} is above --max-temperature {config.max_temperature}")
    if config.top_k > config.max_top_k:
        parser.error(f"--top-k {config.top_k} is above --max-top-k {config.max_top_k}")
    if config.max_tokens > config.max_tokens_limit:
        parser.error(f"--max-tokens {config.max_tokens} is above --max-tokens-limit {config.max_tokens_limit}")
    return config


def load_workers(args, parser):
    """One (model, tokenizer, engine) replica per GPU, or one on CPU / MPS."""
    from nanochat.checkpoint import CheckpointError, load_model, resolve_checkpoint
    from nanochat.common import autodetect_device_type
    try:
        device_type = autodetect_device_type(args.device_type)
    except (ValueError, RuntimeError) as e:
        parser.error(f"--device-type: {e}")
    if device_type != "cuda" and args.num_gpus != 1:
        parser.error(f"--num-gpus {args.num_gpus} needs CUDA; on {device_type} there is one worker")
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        parser.error(f"--num-gpus {args.num_gpus}: only {torch.cuda.device_count()} GPU(s) are visible")
    devices = [torch.device("cuda", i) for i in range(args.num_gpus)] if device_type == "cuda" else [torch.device(device_type)]
    workers = []
    try:
        ckpt_dir, step = resolve_checkpoint(args.source, args.model_tag, args.step)
        from nanochat.engine import Engine
        for device in devices:
            model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=os.path.basename(ckpt_dir), step=step)
            workers.append(Worker(Engine(model, tokenizer, compile=args.compile), tokenizer, device, context_len=model.config.sequence_len))
            print(f"loaded {ckpt_dir} step {step} on {device}", flush=True)
    except (CheckpointError, FileNotFoundError, ValueError) as e:  # no checkpoint / tokenizer, or they do not fit
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    return workers, f"nanochat-{args.source}-{os.path.basename(ckpt_dir)}-step{step}"


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    import uvicorn
    workers, model_id = load_workers(args, parser)
    app = create_app(WorkerPool(workers, config.max_queue), config, model_id)
    print(f"serving {model_id} with {len(workers)} worker(s)", flush=True)
    # uvicorn's access log is off: each request logs its own line (size, tokens, duration)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info", timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
