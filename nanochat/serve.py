"""
The chat server's machinery; its command line and HTTP routes are scripts/chat_web.py.

parse_request reads an OpenAI chat-completions body into a ChatRequest: unknown top-level fields are
ignored (OpenAI clients send many), known ones are checked, the conversation goes through the one
validator (nanochat.conversation); bad input raises RequestError, a 4xx JSON error in OpenAI's shape
({"error": {"message", "type", "param", "code"}}) naming the field and the limit's flag. Then the replies'
shapes (the page's events, OpenAI's reply and chunks) and uvicorn's configuration (deadlines for slow
clients, a connection cap). The model replicas, their queue and the per-request log line are
nanochat/workers.py.
"""
import asyncio
import contextlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass

from nanochat.conversation import ROLES, ConversationError, content_text, validate_conversation


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
    max_n: int = 8  # choices per request (each also needs a slot of one replica's --max-batch)
    max_body_bytes: int = 1_000_000
    max_queue: int = 32  # requests waiting for a worker; more get 429
    queue_timeout: float = 60.0  # seconds a request may wait for a worker before a 503
    header_timeout: float = 10.0  # seconds for a request's headers, then 408 and the connection closed
    body_timeout: float = 30.0  # seconds for its body, then 408; connections beyond max_connections get 503
    max_connections: int = 128

# -----------------------------------------------------------------------------
# Errors, in OpenAI's shape

class RequestError(Exception):
    """A refused request (or, status 500, a failed one); .response() is its JSON response, with Retry-After
    when the server is busy (429, 503)."""
    KINDS = {429: "rate_limit_error", 500: "server_error", 503: "server_overloaded"}

    def __init__(self, status, message, code, param=None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response_body(self):
        kind = self.KINDS.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self):
        from fastapi.responses import JSONResponse
        return JSONResponse(self.response_body(), status_code=self.status,
                            headers={"Retry-After": "5"} if self.status in (429, 503) else None)


def _bad(message, param, code="invalid_value"):
    return RequestError(400, message, code, param)

# -----------------------------------------------------------------------------
# Requests

@dataclass
class ChatRequest:
    """A parsed request: a chat conversation (kind "chat": messages) or a plain-text prompt (kind "text":
    POST /v1/completions, for base models)."""
    messages: list | None
    chars: int
    temperature: float
    top_k: int
    top_p: float
    max_tokens: int
    stream: bool
    include_usage: bool
    seed: int
    n: int = 1  # choices, sampled together in one replica's batch with seeds seed, seed + 1, ...
    stop: tuple = ()  # strings that end a choice (not included in its text)
    logprobs: bool = False
    top_logprobs: int = 0
    kind: str = "chat"
    prompt: str | None = None


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


def _message_text(content, i):
    """An OpenAI message's content as text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported",
                           f"messages[{i}].content", "unsupported_content")
    elif not isinstance(content, str):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content", "invalid_type")
    return content_text(content)


def parse_messages(messages, config):
    """OpenAI's messages -> ([{"role", "content": str}], total characters). The OpenAI side is read here
    ("developer" is the system message, text parts are joined, other keys such as "name" are dropped) and
    the limits apply; then nanochat.conversation's rules, and the last message must be the user's."""
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
        role = "system" if role == "developer" else role  # OpenAI's newer name for the system message
        if role not in ROLES:
            raise _bad(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {json.dumps(role)[:40]}",
                       f"messages[{i}].role", "invalid_role")
        text = _message_text(m.get("content"), i)
        if len(text) > config.max_message_chars:
            raise _bad(f"messages[{i}] has {len(text)} characters (server limit --max-message-chars={config.max_message_chars})",
                       f"messages[{i}].content", "message_too_long")
        total += len(text)
        out.append({"role": role, "content": text})
    if total > config.max_total_chars:
        raise _bad(f"the messages have {total} characters in total (server limit --max-total-chars={config.max_total_chars})",
                   "messages", "conversation_too_long")
    try:
        validate_conversation(out, strict=False, ends_with_user=True)
    except ConversationError as e:  # named as clients name it: messages[i]
        where = "messages" if e.index is None else f"messages[{e.index}]"
        param = f"{where}.{e.field}" if e.index is not None and e.field else where
        raise _bad(e.reason if e.index is None else f"{where} {e.reason}", param,
                   "invalid_role" if e.field == "role" else "invalid_value") from None
    return out, total


def _json_object(raw):
    if not raw or not raw.strip():
        raise RequestError(400, "empty request body: expected a JSON object", "empty_body")
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
    return body


def _flag(body, name, default=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be true or false", name, "invalid_type")
    return value


def _prompt(prompt, config):
    """/v1/completions' prompt: a string, or a list holding one string."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string (or a list of exactly one)", "prompt",
                   "missing_field" if prompt is None else "invalid_type")
    if len(prompt) > config.max_total_chars:
        raise _bad(f"the prompt has {len(prompt)} characters (server limit --max-total-chars={config.max_total_chars})",
                   "prompt", "conversation_too_long")
    return prompt


def _stop(stop):
    """OpenAI's stop: a string or a list of up to 4 non-empty strings."""
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(x, str) and 0 < len(x) <= 200 for x in stops):
        raise _bad("'stop' must be a string or a list of up to 4 strings of 1-200 characters", "stop",
                   "invalid_type" if not isinstance(stops, list) else "invalid_value")
    return tuple(stops)


def parse_request(raw, config, default_stream=False, kind="chat"):
    """Request body bytes -> ChatRequest, or RequestError naming the problem. kind "chat": OpenAI's chat
    completions body; kind "text": its (legacy) completions body, a prompt instead of messages."""
    body = _json_object(raw)
    if kind == "chat":
        messages, chars = parse_messages(body.get("messages"), config)
        prompt = None
        logprobs = _flag(body, "logprobs")
        top_logprobs = _number(body, "top_logprobs", 0, 0, 20, integer=True)
        if top_logprobs and not logprobs:
            raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    else:
        prompt, messages = _prompt(body.get("prompt"), config), None
        chars = len(prompt)
        top_logprobs = _number(body, "logprobs", None, 0, 5, integer=True)  # completions: how many alternatives
        logprobs, top_logprobs = top_logprobs is not None, top_logprobs or 0
        for name in ("echo", "suffix"):
            if body.get(name) not in (None, False, ""):
                raise _bad(f"'{name}' is not supported by this server", name, "unsupported_value")
    n = _number(body, "n", 1, 1, config.max_n, "--max-n", integer=True)
    if body.get("best_of") not in (None, 1, n):
        raise _bad("'best_of' is not supported by this server", "best_of", "unsupported_value")
    stream = _flag(body, "stream", default_stream)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("'stream_options.include_usage' must be true or false", "stream_options", "invalid_type")
    if body.get("model") is not None and not isinstance(body["model"], str):  # checked, not used: one model per server
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
        n=n, stop=_stop(body.get("stop")), logprobs=logprobs, top_logprobs=top_logprobs, kind=kind, prompt=prompt,
    )


async def read_body(request, limit, timeout=None):
    """The body's bytes; RequestError 413 as soon as it is (or says it will be) over `limit`, 408 when it has
    not all arrived within `timeout` seconds (a client trickling it byte by byte would hold the request)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise RequestError(413, f"request body is {length} bytes (server limit --max-body-bytes={limit})", "body_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"request body is over {limit} bytes (server limit --max-body-bytes={limit})",
                                       "body_too_large")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(408, f"the request body did not arrive within {timeout:g}s (server limit --body-timeout)",
                           "body_timeout") from None
    return b"".join(chunks)


async def wait_for_disconnect(request):
    """Returns when the client has gone (after the body was read, receive() only reports that)."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a server that cannot tell: treat as gone only if it says so
        await asyncio.Event().wait()

# -----------------------------------------------------------------------------
# The HTTP server: uvicorn, with a deadline for request headers

def uvicorn_config(app, config, host="127.0.0.1", port=8000, **kwargs):
    """uvicorn's Config for `app`: at most config.max_connections connections (a 503 beyond), and a 408 and
    close for a connection whose next request's headers are not in within config.header_timeout seconds
    (uvicorn has no such deadline: a client trickling headers would hold a connection for ever)."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.request_seen = None
            self._arm()

        def _arm(self):
            self.deadline = self.loop.call_later(config.header_timeout, self._too_slow)

        def _too_slow(self):
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

        def _headers_done(self):  # a new request cycle exists once h11 has parsed a request's headers
            if self.cycle is not None and self.cycle is not self.request_seen:
                self.request_seen = self.cycle
                if self.deadline is not None:
                    self.deadline.cancel()
                    self.deadline = None
                return True
            return False

        def data_received(self, data):
            super().data_received(data)
            self._headers_done()

        def on_response_complete(self):
            super().on_response_complete()  # may already start a pipelined request
            if not self._headers_done() and not self.transport.is_closing():  # re-arm for the next request
                self._arm()

        def connection_lost(self, exc):
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

    return uvicorn.Config(app, host=host, port=port, http=HeaderDeadlineProtocol,
                          limit_concurrency=config.max_connections, **kwargs)


@contextlib.contextmanager
def serve_in_thread(app, **kwargs):
    """uvicorn serving chat_web's `app` from a thread on a free port of 127.0.0.1; yields the base URL (tests,
    bench/serve.py). Proto IPPROTO_TCP, as uvicorn's own socket: asyncio then turns Nagle off (with a plain
    socket() each stream's second chunk waits ~40 ms for the client's delayed ACK)."""
    import socket, threading, uvicorn  # noqa: E401
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    kwargs = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 2, **kwargs}
    server = uvicorn.Server(uvicorn_config(app, app.state.config, **kwargs))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# -----------------------------------------------------------------------------
# Replies: the page's events {"token"}... {"done"}; OpenAI's chat.completion and its chunks

def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(jobs):
    prompt, completion = len(jobs[0].prompt), sum(j.completion_tokens for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _head(model_id, kind):
    prefix = "cmpl" if kind == "text_completion" else "chatcmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model_id,
            "system_fingerprint": None}


def _token_bytes(tokenizer, token):
    try:
        return list(tokenizer.enc.decode_single_token_bytes(token))
    except (AttributeError, KeyError):  # a special token
        return list(tokenizer.id_to_token(token).encode("utf-8"))


def logprobs_body(job, start=0, offset=0):
    """OpenAI's logprobs object for the job's tokens from index `start`: chat's {"content": [{token, logprob,
    bytes, top_logprobs}]}, or the completions API's {tokens, token_logprobs, top_logprobs, text_offset}
    (offsets from `offset`, in characters of the completion). Log-probabilities are the model's own
    distribution (before temperature, top-k and top-p); None when the request did not ask for them."""
    if not job.request.logprobs:
        return None
    tok, entries = job.pool.tokenizer, job.logprobs[start:]
    if job.request.kind == "chat":
        def one(t, lp):
            return {"token": tok.id_to_token(t), "logprob": lp, "bytes": _token_bytes(tok, t)}
        return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]} for t, lp, top in entries]}
    tokens = [tok.id_to_token(t) for t, _, _ in entries]
    offsets = [offset + sum(len(x) for x in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{tok.id_to_token(a): b for a, b in top} for _, _, top in entries], "text_offset": offsets}


async def page_events(jobs):
    job = jobs[0]  # the page asks for one reply
    try:
        async for piece in job.pieces():
            yield sse({"token": piece})
        yield sse({"done": True, "finish_reason": job.finish_reason, **usage(jobs)})
    except RuntimeError as e:
        yield sse({"error": str(e)})


def _choice(job, text, logprobs, finish, stream):
    if job.request.kind == "text":
        return {"index": job.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    key, message = ("delta", {"content": text} if text is not None else {}) if stream else \
        ("message", {"role": "assistant", "content": text})
    return {"index": job.index, key: message, "logprobs": logprobs, "finish_reason": finish}


async def _deltas(job):
    """One choice's streamed choices: one per piece of text, then one with its finish_reason."""
    sent, chars = 0, 0
    async for piece in job.pieces():
        yield _choice(job, piece, logprobs_body(job, sent, chars), None, True)
        sent, chars = len(job.logprobs), chars + len(piece)
    yield _choice(job, None if job.request.kind == "chat" else "", None, job.finish_reason, True)


async def _merged(jobs):
    """The n choices' deltas as they come; a RuntimeError (a choice failed) after the others are done."""
    merged, failed, done = asyncio.Queue(), None, 0

    async def drain(job):
        try:
            async for item in _deltas(job):
                await merged.put(item)
        except RuntimeError as e:
            await merged.put(e)
        finally:
            await merged.put(None)

    tasks = [asyncio.ensure_future(drain(job)) for job in jobs]
    try:
        while done < len(jobs):
            item = await merged.get()
            if item is None:
                done += 1
            elif isinstance(item, RuntimeError):
                failed = failed or item
            elif failed is None:
                yield item
    finally:
        for task in tasks:
            task.cancel()
    if failed is not None:
        raise failed


async def openai_events(jobs, model_id):
    """OpenAI's streamed reply: chunks from the n choices as they come, a last chunk per choice with its
    finish_reason, the usage chunk when asked for, then [DONE]. The chunks' fixed fields are JSON-encoded
    once per reply, not once per chunk."""
    request = jobs[0].request
    head = _head(model_id, "chat.completion.chunk" if request.kind == "chat" else "text_completion")
    prefix = "data: " + json.dumps(head, ensure_ascii=False)[:-1] + ', "choices": ['
    if request.kind == "chat":
        for job in jobs:
            yield prefix + json.dumps({"index": job.index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}) + "]}\n\n"
    try:
        stream = _deltas(jobs[0]) if len(jobs) == 1 else _merged(jobs)
        async with contextlib.aclosing(stream):  # a client gone: the choices' tasks end now
            async for item in stream:
                yield prefix + json.dumps(item, ensure_ascii=False) + "]}\n\n"
    except RuntimeError as failed:
        yield sse(RequestError(500, str(failed), "generation_failed").response_body())
    else:
        if request.include_usage:
            yield sse({**head, "choices": [], "usage": usage(jobs)})
    yield "data: [DONE]\n\n"


async def openai_reply(jobs, model_id):
    """The whole reply: a chat.completion or text_completion with n choices (RuntimeError if one failed)."""
    async def text(job):
        return "".join([piece async for piece in job.pieces()])
    texts = await asyncio.gather(*(text(job) for job in jobs))
    kind = "chat.completion" if jobs[0].request.kind == "chat" else "text_completion"
    return {**_head(model_id, kind),
            "choices": [_choice(job, t, logprobs_body(job), job.finish_reason, False) for job, t in zip(jobs, texts)],
            "usage": usage(jobs)}
