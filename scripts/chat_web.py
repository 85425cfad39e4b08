"""
Web chat: a ChatGPT-like page and an OpenAI-compatible API in front of a pool of model replicas.

python -m scripts.chat_web -i sft --port 8000 --host 127.0.0.1
python -m scripts.chat_web -i sft --num-gpus 8 --host 0.0.0.0 --max-batch 32 --max-queue 64

Each replica decodes up to --max-batch requests together (continuous batching); more wait in a FIFO queue.

Endpoints
    GET  /                      the chat page (nanochat/ui.html: one file, no build step, nothing external)
    POST /chat/completions      the page's endpoint: server-sent events {"token": ...}, then {"done": true, ...}
    POST /v1/chat/completions   OpenAI chat completions (messages, temperature, top_p, max_tokens, stream, n,
                                stop, seed, logprobs, top_logprobs, stream_options.include_usage); nanochat
                                extension: top_k. A temperature below 1e-4 is greedy; the most likely token is
                                always kept, however small top_p
    GET  /v1/models             OpenAI model list (one model)
    POST /v1/completions        OpenAI (legacy) text completions: prompt in, text out, for base models
    GET  /health, GET /stats    liveness, defaults and limits; worker, queue and throughput counters (JSON)
    GET  /metrics               the same and latency histograms in Prometheus' text format

This script is the command line and the HTTP routes; the machinery is nanochat/serve.py (requests, replies,
uvicorn) and nanochat/workers.py (replicas, continuous batching, the queue).
"""
import asyncio
import os
import time
from contextlib import asynccontextmanager
from dataclasses import asdict
from functools import partial

import torch

from nanochat.common import make_parser, non_negative_float, non_negative_int, number_type, positive_float, positive_int
from nanochat.serve import (RequestError, ServeConfig, openai_events, openai_reply, page_events, parse_request, read_body,
                            uvicorn_config, wait_for_disconnect)
from nanochat.workers import RequestLog, ServerMetrics, Worker, WorkerPool

from ._cli import add_model_source_flags, device_type_or_exit, load_model_or_exit

UI_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

# -----------------------------------------------------------------------------
# The app: routes over nanochat.serve's pool, parsing and replies

def internal_error(exc):
    return RequestError(500, f"internal error: {type(exc).__name__}: {str(exc)[:200]}", "internal_error")


def create_app(pool, config, model_id):
    """The FastAPI app over a WorkerPool. config: ServeConfig (defaults and limits)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    with open(UI_PATH, encoding="utf-8") as f:
        page = f.read()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        pool.start()
        yield
        pool.stop()

    app = FastAPI(title="nanochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = ServerMetrics(pool)
    app.state.pool, app.state.config, app.state.metrics = pool, config, metrics

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):  # 404, 405 in the same JSON shape as ours
        return RequestError(exc.status_code, str(exc.detail), str(exc.status_code)).response()

    @app.exception_handler(Exception)
    async def unexpected_error(request, exc):  # anywhere else: JSON too, and the server stays up
        return internal_error(exc).response()

    class EventStream(StreamingResponse):
        """Server-sent events; however the response ends (done, client gone, error), the generation
        is cancelled and the request logged."""
        media_type = "text/event-stream"

        def __init__(self, content, jobs, log):
            super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self.jobs, self.log = jobs, log

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                for job in self.jobs:
                    if job.finish_reason is None:
                        job.cancelled.set()
                finish = ",".join(job.finish_reason or "cancelled" for job in self.jobs)
                self.log.emit(200, completion_tokens=sum(j.completion_tokens for j in self.jobs), finish=finish,
                              worker=self.jobs[0].worker.name)

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

    @app.get("/metrics")
    async def prometheus_metrics():
        return metrics.response()

    def model_card():
        return {"id": model_id, "object": "model", "created": created, "owned_by": "nanochat"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        if name != model_id:
            return RequestError(404, f"model '{name}' does not exist; this server has '{model_id}'", "model_not_found",
                                "model").response()
        return model_card()

    async def start_jobs(request, log, default_stream, kind):
        """Read, validate, encode, queue: the request's jobs (one per choice); a RequestError, or None if the
        client left."""
        try:
            raw = await read_body(request, config.max_body_bytes, config.body_timeout)
        except ClientDisconnect:
            return None
        req = parse_request(raw, config, default_stream, kind)
        if req.n > pool.max_n:
            raise RequestError(400, f"'n' is {req.n}; a replica decodes at most {pool.max_n} sequences together "
                                    "(server limit --max-batch)", "invalid_value", "n")
        if kind == "chat":  # valid: parse_request checked it
            prompt = pool.tokenizer.render_for_completion({"messages": req.messages})
        else:  # a base model's plain text
            prompt = pool.tokenizer.encode(req.prompt, prepend=pool.tokenizer.get_bos_token_id())
        log.fields.update(stream=int(req.stream), messages=len(req.messages or ()), n=req.n, chars=req.chars,
                          prompt_tokens=len(prompt))
        if pool.context_len:
            room = pool.context_len - len(prompt)
            if room < 1:
                what = "conversation" if kind == "chat" else "prompt"
                raise RequestError(400, f"the {what} is {len(prompt)} tokens; the model's context is {pool.context_len} "
                                        f"tokens: shorten it", "context_length_exceeded", "messages" if kind == "chat" else "prompt")
            req.max_tokens = min(req.max_tokens, room)
        # wait for a worker, unless the queue is full, the wait is too long, or the client leaves meanwhile
        acquiring = pool.acquire(req.n)
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
                                    "the server is busy, retry later", "queue_timeout")
        worker = acquiring.result()
        if gone in done:
            pool.give_back(worker, req.n)
            return None
        return pool.submit(worker, prompt, req)

    async def complete(request, kind, openai_format=True):
        log = RequestLog(request, metrics.request_done)
        pool.counts["requests"] += 1
        try:
            jobs = await start_jobs(request, log, default_stream=not openai_format, kind=kind)
        except Exception as e:  # refused (RequestError), or something broke (e.g. a tampered tokenizer): JSON either way
            e = e if isinstance(e, RequestError) else internal_error(e)
            pool.counts["refused" if e.status in (429, 503) else "rejected" if e.status < 500 else "failed"] += 1
            log.emit(e.status, error=e.code)
            return e.response()
        if jobs is None:
            pool.counts["cancelled"] += 1
            log.emit(499, error="client_gone")
            return Response(status_code=499)
        req, worker = jobs[0].request, jobs[0].worker.name
        log.fields["seed"] = req.seed
        if req.stream:
            return EventStream(openai_events(jobs, model_id) if openai_format else page_events(jobs), jobs, log)
        # not streaming: collect the reply, cancelling if the client leaves meanwhile
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        watcher.add_done_callback(lambda t: t.cancelled() or [job.cancelled.set() for job in jobs])
        try:
            reply = await openai_reply(jobs, model_id)
        except RuntimeError as e:
            for job in jobs:
                job.cancelled.set()
            log.emit(500, error="generation_failed", worker=worker)
            return RequestError(500, str(e), "generation_failed").response()
        finally:
            watcher.cancel()
        tokens = sum(job.completion_tokens for job in jobs)
        if any(job.finish_reason is None for job in jobs):  # cancelled: the client is gone
            log.emit(499, completion_tokens=tokens, error="client_gone", worker=worker)
            return Response(status_code=499)
        log.emit(200, completion_tokens=tokens, finish=",".join(job.finish_reason for job in jobs), worker=worker)
        return reply

    @app.post("/chat/completions")  # the page's endpoint
    async def page_chat(request: Request):
        return await complete(request, "chat", openai_format=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, "chat")

    @app.post("/v1/completions")  # plain text in, plain text out: for base models
    async def completions(request: Request):
        return await complete(request, "text")

    return app


# -----------------------------------------------------------------------------
# Command line

port_number = number_type(int, lambda n: 0 <= n <= 65535, "a port in [0, 65535]", "port_number")


def get_parser():
    d = ServeConfig()
    p = make_parser(__doc__)
    add_model_source_flags(p)
    p.add_argument("--num-gpus", type=positive_int, default=1, help="model replicas, one per GPU (CUDA only)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="port to listen on")
    p.add_argument("--temperature", type=non_negative_float, default=d.temperature, help="default sampling temperature")
    p.add_argument("--top-k", type=non_negative_int, default=d.top_k, help="default top-k (0 = off)")
    p.add_argument("--max-tokens", type=positive_int, default=d.max_tokens, help="default reply length limit in tokens")
    p.add_argument("--max-batch", type=positive_int, default=16,  # bench/serve.py's sweep (docs/benchmarks.md)
                   help="requests each replica decodes together (continuous batching); more wait in the queue")
    p.add_argument("--max-cached-tokens", type=positive_int, default=None,
                   help="KV-cache budget per replica in tokens (a request reserves prompt + max_tokens); "
                        "default --max-batch x the model's context")
    g = p.add_argument_group("limits (requests outside them get a 4xx error naming the flag)")
    g.add_argument("--max-messages", type=positive_int, default=d.max_messages, help="messages per request")
    g.add_argument("--max-message-chars", type=positive_int, default=d.max_message_chars, help="characters per message")
    g.add_argument("--max-total-chars", type=positive_int, default=d.max_total_chars, help="characters per request")
    g.add_argument("--max-temperature", type=non_negative_float, default=d.max_temperature, help="highest temperature")
    g.add_argument("--max-top-k", type=non_negative_int, default=d.max_top_k, help="highest top-k")
    g.add_argument("--max-tokens-limit", type=positive_int, default=d.max_tokens_limit, help="highest max_tokens")
    g.add_argument("--max-n", type=positive_int, default=d.max_n, help="choices per request (n)")
    g.add_argument("--max-body-bytes", type=positive_int, default=d.max_body_bytes, help="request body size")
    g.add_argument("--max-queue", type=non_negative_int, default=d.max_queue,
                   help="requests waiting for a worker; more get 429")
    g.add_argument("--queue-timeout", type=positive_float, default=d.queue_timeout,
                   help="seconds a request may wait for a worker before a 503")
    g.add_argument("--header-timeout", type=positive_float, default=d.header_timeout,
                   help="seconds a client has to send a request's headers; then 408 and the connection is closed")
    g.add_argument("--body-timeout", type=positive_float, default=d.body_timeout,
                   help="seconds a client has to send a request's body; then 408")
    g.add_argument("--max-connections", type=positive_int, default=d.max_connections,
                   help="open connections; a request beyond them gets 503")
    return p


def config_from_args(args, parser):
    config = ServeConfig(**{f: getattr(args, f) for f in ServeConfig.__dataclass_fields__})
    for name, limit in (("temperature", "max_temperature"), ("top_k", "max_top_k"), ("max_tokens", "max_tokens_limit")):
        value, most = getattr(config, name), getattr(config, limit)
        if value > most:
            parser.error(f"--{name.replace('_', '-')} {value} is above --{limit.replace('_', '-')} {most}")
    return config


def load_workers(args, parser):
    """One (model, tokenizer, engine) replica per GPU, or one on CPU / MPS."""
    from nanochat.batching import BatchScheduler
    from nanochat.engine import Engine
    device_type = device_type_or_exit(parser, args)
    if device_type != "cuda" and args.num_gpus != 1:
        parser.error(f"--num-gpus {args.num_gpus} needs CUDA; on {device_type} there is one worker")
    if device_type == "cuda" and args.num_gpus > torch.cuda.device_count():
        parser.error(f"--num-gpus {args.num_gpus}: only {torch.cuda.device_count()} GPU(s) are visible")
    if args.max_cached_tokens is not None and args.max_cached_tokens < args.max_batch:
        parser.error(f"--max-cached-tokens {args.max_cached_tokens} is below --max-batch {args.max_batch}")
    devices = [torch.device("cuda", i) for i in range(args.num_gpus)] if device_type == "cuda" else [torch.device(device_type)]
    workers = []
    for device in devices:
        model, tokenizer, ckpt_dir, step = load_model_or_exit("chat_web", args, device)
        args.model_tag, args.step = os.path.basename(ckpt_dir), step  # every replica loads the first one's checkpoint
        if (args.max_cached_tokens or model.config.sequence_len) < model.config.sequence_len:
            parser.error(f"--max-cached-tokens {args.max_cached_tokens} is below the model's context "
                         f"({model.config.sequence_len} tokens): one full conversation must fit")
        engine = Engine(model, tokenizer, compile=args.compile)
        make_scheduler = partial(BatchScheduler, engine, args.max_batch, args.max_cached_tokens)
        workers.append(Worker(make_scheduler, tokenizer, device, context_len=model.config.sequence_len))
        print(f"loaded {ckpt_dir} step {step} on {device}", flush=True)
    return workers, f"nanochat-{args.source}-{args.model_tag}-step{args.step}"


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    workers, model_id = load_workers(args, parser)
    app = create_app(WorkerPool(workers, config.max_queue), config, model_id)
    print(f"serving {model_id} with {len(workers)} worker(s)", flush=True)
    # uvicorn's access log is off: each request logs its own line (size, tokens, duration)
    import uvicorn
    uvicorn.Server(uvicorn_config(app, config, args.host, args.port, access_log=False, log_level="info",
                                  timeout_graceful_shutdown=5)).run()


if __name__ == "__main__":
    main()
