"""
The chat server's model replicas: a Worker per replica decodes up to its max_batch requests together
(continuous batching, nanochat/batching.py) in its own thread, so the event loop stays responsive; a Job
carries one request's tokens from that thread to the request handler (all of a step's tokens in one hand-over
to the event loop); the WorkerPool hands out free slots, requests beyond them waiting in a bounded FIFO queue
(429 when it is full), and a client that goes away has its request cancelled at the next decode step;
ServerMetrics exposes the pool to Prometheus and RequestLog writes a line per request. The HTTP side is
nanochat/serve.py.
"""
import asyncio
import queue
import threading
import time
from collections import Counter, deque
from contextlib import nullcontext

import torch

from nanochat.common import autocast_context, get_compute_dtype
from nanochat.serve import RequestError
from nanochat.tokenizer import StreamDecoder

# Seconds the worker pauses after handing out new requests' first tokens when a decode forward of other rows
# follows (Worker._first_tokens). Measured with bench/serve.py at 8 streams on 2 cores: TTFT p95 61-62 ms -> 41-49 ms
# at 2 ms, tokens/s unchanged (45 ms at 5 ms, with lower tokens/s); one pause per admission, not per step.
FIRST_TOKEN_PAUSE = 0.002


class Worker:
    """A model replica: a scheduler (nanochat.batching.BatchScheduler, or anything with its submit / step /
    has_work / max_batch and requests with cancel() and finish_reason) driven by the worker's own thread, its
    tokenizer and device. context_len (the model's sequence length) bounds prompt + reply. Jobs arrive in
    `inbox`; each step's tokens go to their jobs on the event loop, in one call per step. A scheduler that
    fails fails the jobs it held (an "error" event each) and is replaced by a fresh one from make_scheduler()."""

    def __init__(self, make_scheduler, tokenizer, device="cpu", context_len=None):
        self.make_scheduler, self.tokenizer = make_scheduler, tokenizer
        self.scheduler = make_scheduler()
        self.max_batch = self.scheduler.max_batch
        self.device = torch.device(device)
        self.name = str(self.device)
        self.context_len = context_len
        self.stop_tokens = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.inbox = queue.SimpleQueue()
        self.jobs = {}  # scheduler request -> Job, in the worker thread
        self.outbox = []  # (job, (kind, value)) for the event loop, sent together once per step (flush)
        self.wake = threading.Event()
        self.stopping = False
        self.thread = None
        self.served = 0
        self.step_seconds = 0.0  # time spent in scheduler steps (for tokens/s while busy)

    def start(self):
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"chat-worker-{self.name}", daemon=True)
        self.thread.start()

    def stop(self):
        self.stopping = True
        self.wake.set()
        if self.thread is not None:
            self.thread.join(10)

    def submit(self, job):
        self.inbox.put(job)
        self.wake.set()

    def _attach(self, scheduler):
        """A scheduler with on_first_tokens (BatchScheduler) hands a new request's first token out before the
        batch's decode forward; it is sent to the loop at once (_first_tokens)."""
        if hasattr(scheduler, "on_first_tokens"):
            scheduler.on_first_tokens = lambda events: self._first_tokens(scheduler, events)
        return scheduler

    def _first_tokens(self, scheduler, events):
        """New requests' first tokens to the event loop now; then, if the step goes on to a decode forward of the
        other rows, a pause of FIRST_TOKEN_PAUSE: that forward's threads would otherwise hold both cores while
        the loop (and the GIL it needs between the forward's ops) tries to send the tokens, which is most of
        the time to first token of a request joining a busy batch."""
        self._hand_out(events)
        self.flush()
        if len(scheduler.active) > len(events):
            time.sleep(FIRST_TOKEN_PAUSE)

    def _hand_out(self, events):
        now = time.perf_counter()
        for event in events:
            job = self.jobs[event.request]
            if job.generated == 0:
                job.first_token_at = now
            job.generated += 1
            if event.token not in self.stop_tokens:
                job.put("token", (event.token, getattr(event, "logprob", None), getattr(event, "top_logprobs", None)))

    def flush(self):
        """In the worker thread: what the step gave every job, to the event loop in one call (one wake-up of
        the loop per step, not one per token per stream)."""
        if not self.outbox:
            return
        items, self.outbox = self.outbox, []
        for loop in {job.loop for job, _ in items}:
            mine = [(job, item) for job, item in items if job.loop is loop]
            try:
                loop.call_soon_threadsafe(_deliver, mine)
            except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
                for job, _ in mine:
                    job.cancelled.set()

    def _loop(self):
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        # the worker's device, mixed precision (the weights' casts cached across steps), no grad
        with on_device, torch.no_grad(), autocast_context(self.device.type, get_compute_dtype(self.device.type)):
            # a compiled decode step compiles before the first request (BatchScheduler.warm_up)
            seconds = self.scheduler.warm_up() if hasattr(self.scheduler, "warm_up") else None
            if seconds is not None:
                print(f"{self.name}: decode step compiled in {seconds:.1f}s", flush=True)
            self._attach(self.scheduler)
            while not self.stopping:
                while not self.inbox.empty():
                    self._start(self.inbox.get())
                for request, job in self.jobs.items():
                    if job.cancelled.is_set():
                        request.cancel()
                if not self.scheduler.has_work():
                    self.flush()
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                t0 = time.perf_counter()
                try:
                    events = self.scheduler.step()
                except Exception as e:  # the model or a tampered file failed: fail what it held, start afresh
                    for job in self.jobs.values():
                        job.finish("error", e)
                    self.jobs.clear()
                    self.scheduler = self._attach(self.make_scheduler())
                    self.flush()
                    continue
                finally:
                    self.step_seconds += time.perf_counter() - t0
                self._hand_out(events)
                for request in [r for r in self.jobs if r.finish_reason is not None]:
                    self.jobs.pop(request).finish(request.finish_reason)
                self.flush()

    def _start(self, job):
        r = job.request
        if job.cancelled.is_set():
            job.finish("cancelled")
            return
        try:
            options = {"logprobs": r.top_logprobs} if r.logprobs else {}
            request = self.scheduler.submit(job.prompt, max_tokens=r.max_tokens, temperature=r.temperature,
                                            top_k=r.top_k or None, top_p=r.top_p if r.top_p < 1.0 else None,
                                            seed=job.seed, **options)
        except Exception as e:  # e.g. over the replica's cached-token budget
            job.finish("error", e)
            return
        if request.finish_reason is not None:  # nothing to generate (max_tokens 0)
            job.finish(request.finish_reason)
        else:
            self.jobs[request] = job


class Job:
    """One choice of a request's generation (a request with n > 1 has n jobs, seeds seed, seed + 1, ...). The
    worker thread puts ("token", (id, logprob, top_logprobs)), then ("end", finish_reason) or ("error", exc),
    and always ("closed", None) last; its worker sends each step's events of all its jobs to the event loop
    in one call, where they wait in `events` for the request handler (pieces())."""

    def __init__(self, pool, worker, prompt, request, loop, index=0):
        self.pool, self.worker, self.prompt, self.request, self.loop = pool, worker, prompt, request, loop
        self.index, self.seed = index, (request.seed + index) % 2**31
        self.events = deque()  # batches of (kind, value) delivered on the loop, not yet read by pieces()
        self.ready = None  # the future pieces() waits on while `events` is empty
        self.cancelled = threading.Event()
        self.t0 = time.perf_counter()
        self.first_token_at = self.finished_at = None  # perf_counter of the first token generated, of the end
        self.generated = 0  # tokens the model produced (worker side)
        self.completion_tokens = 0  # tokens handed to the request (consumer side)
        self.logprobs = []  # (token id, logprob, [(id, logprob)]) per token handed over, when asked for
        self.finish_reason = None  # "stop" / "length" once the consumer saw the end, "error" if it failed
        self.outcome = None  # the worker's view: "stop", "length", "cancelled" or "error"
        self.stopped = False  # ended by one of the request's stop strings (the worker sees a cancellation)

    def put(self, kind, value=None):
        """In the worker thread: an event for the request handler, sent at the worker's next flush()."""
        self.worker.outbox.append((self, (kind, value)))

    def finish(self, outcome, error=None):
        """In the worker thread: the last events, and the job's slot back to the pool."""
        self.outcome, self.finished_at = outcome, time.perf_counter()
        if outcome == "error":
            self.put("error", error)
        elif outcome != "cancelled":
            self.put("end", outcome)
        self.put("closed")
        self.put("release", (self.generated, time.perf_counter() - self.t0))

    async def _next_events(self):
        """The next batch of events: what one flush of the worker (one step) brought this job."""
        while not self.events:
            self.ready = self.loop.create_future()
            await self.ready
        return self.events.popleft()

    async def pieces(self):
        """The reply's text as it is generated, in non-empty pieces that never split a character and never
        show a stop string (text that may be the start of one is held back until it is known not to be);
        at a stop string the text before it is the last piece and generation is cancelled. Sets
        finish_reason; raises RuntimeError if generation failed."""
        decoder, stops, held, closed = StreamDecoder(self.pool.tokenizer), self.request.stop, "", False
        while not closed:
            for kind, value in await self._next_events():
                if kind == "closed":
                    closed = True
                    break
                if kind == "error":
                    self.finish_reason = "error"
                    raise RuntimeError(f"generation failed: {type(value).__name__}: {value}")
                if kind == "end":
                    self.finish_reason = value
                    continue
                token, logprob, top = value
                self.completion_tokens += 1
                if logprob is not None:
                    self.logprobs.append((token, logprob, top or []))
                held += decoder.push(token)
                hits = [i for i in (held.find(s) for s in stops) if i >= 0]
                if hits:
                    self.stopped, self.finish_reason = True, "stop"
                    self.cancelled.set()
                    if held[:min(hits)]:
                        yield held[:min(hits)]
                    return
            keep = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
            if len(held) > keep:
                yield held[:len(held) - keep]
                held = held[len(held) - keep:]
        held += decoder.flush()
        if held:
            yield held


def _deliver(items):
    """On the event loop: a worker's flush, [(job, (kind, value))] in order. Each job's events arrive as one
    batch (its tokens of one step go out as one piece); its slot goes back to the pool with its "release"."""
    batches, released = {}, []
    for job, (kind, value) in items:
        if kind == "release":
            released.append((job, value))
        else:
            batches.setdefault(job, []).append((kind, value))
    for job, batch in batches.items():
        job.events.append(batch)
        if job.ready is not None and not job.ready.done():
            job.ready.set_result(None)
    for job, value in released:
        job.pool.release(job, *value)


class WorkerPool:
    """Each worker serves up to its max_batch jobs at once. A request takes as many slots as it has choices
    (n), all on one worker (they are sampled together in its batch), on the worker with the most free slots;
    requests that do not fit wait in FIFO order (the first one waiting blocks those behind it, so none
    starves), at most max_queue of them."""

    def __init__(self, workers, max_queue=32, window=60.0):
        self.workers, self.max_queue, self.window = list(workers), max_queue, window
        self.tokenizer = self.workers[0].tokenizer
        self.context_len = min((w.context_len for w in self.workers if w.context_len), default=None)
        self.slots = sum(w.max_batch for w in self.workers)
        self.max_n = max(w.max_batch for w in self.workers)
        self.free = {id(w): w.max_batch for w in self.workers}
        self.waiters = deque()  # (slots wanted, future of the worker)
        self.jobs = set()
        self.listeners = []  # called with each job when it is done (e.g. the server's metrics)
        self.counts = dict(requests=0, served=0, cancelled=0, rejected=0, refused=0, failed=0)
        self.tokens = 0
        self.recent = deque()  # (time, tokens) of finished generations within `window` seconds
        self.started_at = time.time()

    def start(self):
        for w in self.workers:
            w.start()

    def stop(self):
        for job in list(self.jobs):
            job.cancelled.set()
        for w in self.workers:
            w.stop()

    @property
    def busy(self):
        return self.slots - sum(self.free.values())

    @property
    def waiting(self):
        return sum(1 for _, future in self.waiters if not future.done())

    def acquire(self, n=1):
        """A future of the worker whose n slots this request now holds (FIFO); a RequestError 429 at once
        when it would have to wait and the queue is full."""
        if self.waiting >= self.max_queue and (self.waiting or max(self.free.values()) < n):
            raise RequestError(429, f"the server is busy: {self.waiting} requests are already waiting for a worker "
                                    f"(server limit --max-queue={self.max_queue}); retry later", "queue_full")
        future = asyncio.get_running_loop().create_future()
        self.waiters.append((n, future))
        future.add_done_callback(lambda f: f.cancelled() and self._dispatch())  # a waiter that gives up
        self._dispatch()
        return future

    def give_back(self, worker, n=1):
        self.free[id(worker)] += n
        self._dispatch()

    def _dispatch(self):
        while self.waiters:
            n, future = self.waiters[0]
            if future.done():
                self.waiters.popleft()
                continue
            worker = max(self.workers, key=lambda w: self.free[id(w)])
            if self.free[id(worker)] < n:
                return
            self.waiters.popleft()
            self.free[id(worker)] -= n
            future.set_result(worker)

    def submit(self, worker, prompt, request):
        """The request's n jobs on `worker` (which holds n slots for it)."""
        jobs = [Job(self, worker, prompt, request, asyncio.get_running_loop(), i) for i in range(request.n)]
        for job in jobs:
            self.jobs.add(job)
            worker.submit(job)
        return jobs

    def release(self, job, tokens, seconds):
        """On the event loop, when a job is done."""
        self.jobs.discard(job)
        if job.outcome in ("stop", "length") or job.stopped:
            job.worker.served += 1
            self.counts["served"] += 1
        else:
            self.counts["cancelled" if job.outcome == "cancelled" else "failed"] += 1
        self.tokens += tokens
        now = time.time()
        self.recent.append((now, tokens))
        self._prune(now)
        self.give_back(job.worker)
        for listener in self.listeners:
            listener(job)

    def _prune(self, now):
        while self.recent and self.recent[0][0] < now - self.window:
            self.recent.popleft()

    def stats(self):
        now = time.time()
        self._prune(now)
        span = min(self.window, max(now - self.started_at, 1e-9))
        step_seconds = sum(w.step_seconds for w in self.workers)
        active = Counter(id(j.worker) for j in self.jobs)
        return dict(
            workers=len(self.workers), slots=self.slots, busy=self.busy, queue=self.waiting, max_queue=self.max_queue,
            **self.counts, tokens=self.tokens,
            tokens_per_second=round(self.tokens / step_seconds, 2) if step_seconds else 0.0,
            recent_tokens_per_second=round(sum(t for _, t in self.recent) / span, 2),
            uptime_seconds=round(now - self.started_at, 1),
            worker_list=[dict(name=w.name, device=str(w.device), busy=active[id(w)] > 0, active=active[id(w)],
                              max_batch=w.max_batch, served=w.served) for w in self.workers],
        )


class RequestLog:
    """Collects one request's facts; emit() prints them as one line (each path of a request calls it once)
    and tells on_emit(status), e.g. the metrics."""

    def __init__(self, request, on_emit=None):
        self.on_emit = on_emit
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
        if self.on_emit is not None:
            self.on_emit(status)


class ServerMetrics:
    """GET /metrics in Prometheus' text format (prometheus_client; one registry per app). Counters: requests
    by HTTP status, output tokens. Histograms (seconds): time to first token (from the request's arrival at
    its replica, queueing and prefill included) and time per output token after the first. Gauges, read at
    each scrape: output tokens/s over the pool's recent window, requests waiting, batch occupancy (busy
    slots / all slots), and tokens held in the replicas' KV caches."""

    def __init__(self, pool):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nanochat_requests", "HTTP requests by status", ["status"], registry=r)
        self.tokens = Counter("nanochat_output_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("nanochat_time_to_first_token_seconds", "time to the first generated token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("nanochat_time_per_output_token_seconds", "time per generated token after the first",
                              registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        gauges = {"tokens_per_second": ("output tokens per second (recent window)",
                                        lambda: pool.stats()["recent_tokens_per_second"]),
                  "queue_depth": ("requests waiting for a slot", lambda: pool.waiting),
                  "batch_occupancy": ("busy slots / all slots", lambda: pool.busy / pool.slots),
                  "cached_tokens": ("tokens in the replicas' KV caches",
                                    lambda: sum(getattr(w.scheduler, "cached_tokens", 0) for w in pool.workers))}
        for name, (help_text, read) in gauges.items():
            Gauge(f"nanochat_{name}", help_text, registry=r).set_function(read)
        pool.listeners.append(self.job_done)

    def job_done(self, job):
        self.tokens.inc(job.generated)
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.t0)
            if job.generated > 1:
                self.tpot.observe((job.finished_at - job.first_token_at) / (job.generated - 1))

    def request_done(self, status):
        self.requests.labels(str(status)).inc()

    def response(self):
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
