"""
The chat server's model replicas: a Worker per replica decodes up to its max_batch requests together
(continuous batching, nanochat/batching.py) in its own thread, so the event loop stays responsive; a Job
carries one request's tokens from that thread to the request handler; the WorkerPool hands out free slots,
requests beyond them waiting in a bounded FIFO queue (429 when it is full), and a client that goes away has
its request cancelled at the next decode step. The HTTP side is nanochat/serve.py.
"""
import asyncio
import queue
import threading
import time
from collections import deque
from contextlib import nullcontext

import torch

from nanochat.common import autocast_context, get_compute_dtype
from nanochat.serve import RequestError
from nanochat.tokenizer import StreamDecoder


class Worker:
    """A model replica: a scheduler (nanochat.batching.BatchScheduler, or anything with its submit / step /
    has_work / max_batch and requests with cancel() and finish_reason) driven by the worker's own thread, its
    tokenizer and device. context_len (the model's sequence length) bounds prompt + reply. Jobs arrive in
    `inbox`; each step's tokens go to their jobs' queues on the event loop. A scheduler that fails fails the
    jobs it held (an "error" event each) and is replaced by a fresh one from make_scheduler()."""

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

    def _loop(self):
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()
        # the worker's device, mixed precision (the weights' casts cached across steps), no grad
        with on_device, torch.no_grad(), autocast_context(self.device.type, get_compute_dtype(self.device.type)):
            while not self.stopping:
                while not self.inbox.empty():
                    self._start(self.inbox.get())
                for request, job in self.jobs.items():
                    if job.cancelled.is_set():
                        request.cancel()
                if not self.scheduler.has_work():
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
                    self.scheduler = self.make_scheduler()
                    continue
                finally:
                    self.step_seconds += time.perf_counter() - t0
                for event in events:
                    job = self.jobs[event.request]
                    job.generated += 1
                    if event.token not in self.stop_tokens:
                        job.put("token", event.token)
                for request in [r for r in self.jobs if r.finish_reason is not None]:
                    self.jobs.pop(request).finish(request.finish_reason)

    def _start(self, job):
        r = job.request
        if job.cancelled.is_set():
            job.finish("cancelled")
            return
        try:
            request = self.scheduler.submit(job.prompt, max_tokens=r.max_tokens, temperature=r.temperature,
                                            top_k=r.top_k or None, top_p=r.top_p if r.top_p < 1.0 else None, seed=r.seed)
        except Exception as e:  # e.g. over the replica's cached-token budget
            job.finish("error", e)
            return
        if request.finish_reason is not None:  # nothing to generate (max_tokens 0)
            job.finish(request.finish_reason)
        else:
            self.jobs[request] = job


class Job:
    """One request's generation. The worker thread puts ("token", id), then ("end", finish_reason) or
    ("error", exc), and always ("closed", None) last, on an asyncio queue the request handler reads."""

    def __init__(self, pool, worker, prompt, request, loop):
        self.pool, self.worker, self.prompt, self.request, self.loop = pool, worker, prompt, request, loop
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()
        self.t0 = time.perf_counter()
        self.generated = 0  # tokens the model produced (worker side)
        self.completion_tokens = 0  # tokens handed to the request (consumer side)
        self.finish_reason = None  # "stop" / "length" once the consumer saw the end, "error" if it failed
        self.outcome = None  # the worker's view: "stop", "length", "cancelled" or "error"

    def _on_loop(self, callback, *args):
        try:
            self.loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()

    def put(self, kind, value=None):
        self._on_loop(self.events.put_nowait, (kind, value))

    def finish(self, outcome, error=None):
        """In the worker thread: the last events, and the job's slot back to the pool."""
        self.outcome = outcome
        if outcome == "error":
            self.put("error", error)
        elif outcome != "cancelled":
            self.put("end", outcome)
        self.put("closed")
        self._on_loop(self.pool.release, self, self.generated, time.perf_counter() - self.t0)

    async def pieces(self):
        """The reply's text as it is generated, in non-empty pieces that never split a character; sets
        finish_reason; raises RuntimeError if generation failed."""
        decoder = StreamDecoder(self.pool.tokenizer)
        while True:
            kind, value = await self.events.get()
            if kind == "closed":
                break
            if kind == "error":
                self.finish_reason = "error"
                raise RuntimeError(f"generation failed: {type(value).__name__}: {value}")
            if kind == "end":
                self.finish_reason = value
            else:  # a token
                self.completion_tokens += 1
                if piece := decoder.push(value):
                    yield piece
        if piece := decoder.flush():
            yield piece


class WorkerPool:
    """Each worker serves up to its max_batch requests at once; the free slots are an asyncio queue (one
    entry per slot, workers interleaved, so requests spread across replicas), and requests beyond them wait
    in FIFO order, at most max_queue of them."""

    def __init__(self, workers, max_queue=32, window=60.0):
        self.workers, self.max_queue, self.window = list(workers), max_queue, window
        self.tokenizer = self.workers[0].tokenizer
        self.context_len = min((w.context_len for w in self.workers if w.context_len), default=None)
        self.slots = sum(w.max_batch for w in self.workers)
        self.free = None  # asyncio.Queue, made by start() inside the server's event loop
        self.jobs = set()
        self.waiting = 0
        self.counts = dict(requests=0, served=0, cancelled=0, rejected=0, refused=0, failed=0)
        self.tokens = 0
        self.recent = deque()  # (time, tokens) of finished generations within `window` seconds
        self.started_at = time.time()

    def start(self):
        self.free = asyncio.Queue()
        for slot in range(max(w.max_batch for w in self.workers)):
            for w in self.workers:
                if slot < w.max_batch:
                    self.free.put_nowait(w)
        for w in self.workers:
            w.start()

    def stop(self):
        for job in list(self.jobs):
            job.cancelled.set()
        for w in self.workers:
            w.stop()

    @property
    def busy(self):
        return self.slots - self.free.qsize()

    def acquire(self):
        """A task that resolves to a worker with a free slot (FIFO); a RequestError 429 at once when the queue is full."""
        if self.free.empty() and self.waiting >= self.max_queue:
            raise RequestError(429, f"the server is busy: {self.waiting} requests are already waiting for a worker "
                                    f"(server limit --max-queue={self.max_queue}); retry later", "queue_full")
        self.waiting += 1
        task = asyncio.ensure_future(self.free.get())
        task.add_done_callback(self._done_waiting)
        return task

    def _done_waiting(self, task):
        self.waiting -= 1

    def submit(self, worker, prompt, request):
        job = Job(self, worker, prompt, request, asyncio.get_running_loop())
        self.jobs.add(job)
        worker.submit(job)
        return job

    def release(self, job, tokens, seconds):
        """On the event loop, when a job is done."""
        self.jobs.discard(job)
        if job.outcome in ("stop", "length"):
            job.worker.served += 1
            self.counts["served"] += 1
        else:
            self.counts["cancelled" if job.outcome == "cancelled" else "failed"] += 1
        self.tokens += tokens
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
        step_seconds = sum(w.step_seconds for w in self.workers)
        active = {id(w): 0 for w in self.workers}
        for j in self.jobs:
            active[id(j.worker)] += 1
        return dict(
            workers=len(self.workers), slots=self.slots, busy=self.busy, queue=self.waiting, max_queue=self.max_queue,
            **self.counts, tokens=self.tokens,
            tokens_per_second=round(self.tokens / step_seconds, 2) if step_seconds else 0.0,
            recent_tokens_per_second=round(sum(t for _, t in self.recent) / span, 2),
            uptime_seconds=round(now - self.started_at, 1),
            worker_list=[dict(name=w.name, device=str(w.device), busy=active[id(w)] > 0, active=active[id(w)],
                              max_batch=w.max_batch, served=w.served) for w in self.workers],
        )
