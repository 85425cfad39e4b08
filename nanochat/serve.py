"""
The chat server's machinery; its command line and HTTP routes are scripts/chat_web.py.

parse_request reads an OpenAI chat-completions body into a ChatRequest: unknown top-level fields are
ignored (OpenAI clients send many), known ones are checked, the conversation goes through the one
validator (nanochat.conversation); bad input raises RequestError, a 4xx JSON error in OpenAI's shape
({"error": {"message", "type", "param", "code"}}) naming the field and the limit's flag. Then the replies'
shapes (the page's events, OpenAI's reply and chunks), the one log line per request (RequestLog) and
uvicorn's configuration (deadlines for slow clients, a connection cap). The model replicas and their queue
are nanochat/workers.py.
"""
import asyncio
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
    max_body_bytes: int = 1_000_000
    max_queue: int = 32  # requests waiting for a worker; more get 429
    queue_timeout: float = 60.0  # seconds a request may wait for a worker before a 503
    # slow or too many clients: a connection whose request headers take longer than header_timeout is closed
    # (with a 408), a body not received within body_timeout gets a 408, connections beyond max_connections a 503
    header_timeout: float = 10.0
    body_timeout: float = 30.0
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
    messages: list
    chars: int
    temperature: float
    top_k: int
    top_p: float
    max_tokens: int
    stream: bool
    include_usage: bool
    seed: int


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
    stream = default_stream if body.get("stream") is None else body["stream"]
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream", "invalid_type")
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
    """uvicorn's Config for `app`: at most config.max_connections connections (uvicorn answers a request
    beyond them with a 503), and a connection whose next request's headers are not complete within
    config.header_timeout seconds of it opening (or of the previous response) is sent a 408 and closed.
    uvicorn itself has no such deadline, so a client trickling headers byte by byte would hold a connection
    for ever; the body's deadline is read_body's."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.request_seen, self.deadline = None, None
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
            if not self._headers_done() and not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc):
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

    return uvicorn.Config(app, host=host, port=port, http=HeaderDeadlineProtocol,
                          limit_concurrency=config.max_connections, **kwargs)

# -----------------------------------------------------------------------------
# Replies: the page's events {"token"}... {"done"}; OpenAI's chat.completion and its chunks

def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(job):
    return {"prompt_tokens": len(job.prompt), "completion_tokens": job.completion_tokens,
            "total_tokens": len(job.prompt) + job.completion_tokens}


def _head(model_id, kind):
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model_id,
            "system_fingerprint": None}


async def page_events(job):
    try:
        async for piece in job.pieces():
            yield sse({"token": piece})
        yield sse({"done": True, "finish_reason": job.finish_reason, **usage(job)})
    except RuntimeError as e:
        yield sse({"error": str(e)})


async def openai_events(job, model_id):
    head = _head(model_id, "chat.completion.chunk")

    def chunk(delta, finish=None):
        return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in job.pieces():
            yield chunk({"content": piece})
        yield chunk({}, job.finish_reason)
        if job.request.include_usage:
            yield sse({**head, "choices": [], "usage": usage(job)})
    except RuntimeError as e:
        yield sse(RequestError(500, str(e), "generation_failed").response_body())
    yield "data: [DONE]\n\n"


async def openai_reply(job, model_id):
    """The whole reply as one chat.completion (RuntimeError if generation failed)."""
    text = "".join([piece async for piece in job.pieces()])
    return {**_head(model_id, "chat.completion"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": job.finish_reason}],
            "usage": usage(job)}

# -----------------------------------------------------------------------------

class RequestLog:
    """Collects one request's facts; emit() prints them as one line (each path of a request calls it once)."""

    def __init__(self, request):
        self.t0 = time.perf_counter()
        self.fields = dict(method=request.method, path=request.url.path,
                           client=request.client.host if request.client else "-")

    def emit(self, status, **fields):
        f = dict(self.fields, **fields)
        secs = time.perf_counter() - self.t0
        parts = [time.strftime("%Y-%m-%dT%H:%M:%S"), f.pop("method"), f.pop("path"), str(status), f"{secs:.3f}s"]
        completion = f.get("completion_tokens")
        if completion:
            parts.append(f"{completion / secs:.1f}tok/s")
        parts += [f"{k}={v}" for k, v in f.items() if v is not None]
        print(" ".join(parts), flush=True)
