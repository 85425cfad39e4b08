"""
Continuous batching: one model replica decodes all of its active requests together, each at its own position.

    scheduler = BatchScheduler(engine, max_batch=8, max_cached_tokens=8 * 2048)
    request = scheduler.submit(prompt_ids, max_tokens=200, temperature=0.8, top_k=50, seed=1)
    while scheduler.has_work():
        for event in scheduler.step():      # at most one token per active request, one decode forward for all
            ...                             # event.request, event.token, event.sampled, event.logprob
    request.finish_reason                   # "stop", "length" or "cancelled"

Each step: cancelled requests leave (their cache row is reused at once); waiting requests are admitted in
FIFO order while they fit (their prompts prefilled together in one forward, right-padded to the longest,
straight into free rows, each row's logits taken at its own last token) and take their first token; then
one forward feeds every other request's newest token and they take their next. Every request samples from
its own logits, with its own sampling settings and random generator (so its tokens are what Engine.generate
gives it alone, with the same seed) and its own calculator state machine (Engine's RowState); finished
requests leave, and the tokens are returned at once (the forward that feeds them is the next step's). The
new requests' first tokens can be handed out before the batch's forward (on_first_tokens), so that a request
arriving at a full batch waits for the one prefill of those admitted with it, not for a decode step as well
(nor for a prefill per request before it).

The cache (RowKVCache) is one tensor with a row per active request and a length per row: row b attends to
its own first lengths[b] positions through a boolean mask, and its rotary positions start at lengths[b].
Active requests always hold rows [0, n): when one leaves, the last row's cache is moved into its place, so
the forward uses plain views. This padded layout (each row sized to the longest) was chosen over a paged
cache for simplicity; its cost is bounded by admission: a request joins only if (rows after it joins) x
(the longest reservation among them) stays within max_cached_tokens, where a request reserves its prompt
plus max_tokens positions. A request larger than the whole budget is refused at submit; the others wait,
so the cache never grows past the budget. With Engine(compile=True) the decode forward is the engine's
compiled model: its sizes come from tensors, so the three graphs warm_up() compiles serve every row count and
length (a prefill runs eagerly).
"""
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanochat.common import autocast_context, get_compute_dtype
from nanochat.engine import GREEDY_BELOW_TEMPERATURE, RowState, draw, filtered_probs

log = logging.getLogger(__name__)
# One warm-up compiles at a time in a process. Two workers compiling at once (bench.serve's two servers; a server
# with a replica per GPU) left a worker on a graph built without the engine's inductor settings (weights not
# frozen): its decode steps took 2.3x as long (docs/benchmarks.md).
_COMPILING = threading.Lock()


class RowKVCache:
    """Keys and values of up to `rows` sequences, row b holding lengths[b] positions. Before each forward,
    begin(n, t) says that rows [0, n) each get t new tokens (and counts them in lengths); the model then reads
    get_pos() (each row's start position, a tensor), inserts its keys per layer (insert_kv) and applies
    row_mask in attention. The sizes the forward uses (rows, the longest row's end) are tensors' sizes, not
    Python numbers, so a compiled forward is not specialised to them. Each layer's keys and values are
    (rows, H, capacity, D) tensors of their own, as in engine.KVCache (the reason is there)."""

    def __init__(self, num_kv_heads, head_dim, num_layers, dtype, device):
        self.num_kv_heads, self.head_dim, self.dtype, self.device = num_kv_heads, head_dim, dtype, device
        self.keys = [self._zeros(0, 0) for _ in range(num_layers)]
        self.values = [self._zeros(0, 0) for _ in range(num_layers)]
        self.lengths = []
        self.row_mask = None
        self._start = 0  # the first row of the forward begin() prepared

    def _zeros(self, rows, length):
        return torch.zeros(rows, self.num_kv_heads, length, self.head_dim, dtype=self.dtype, device=self.device)

    @property
    def rows(self):
        return self.keys[0].size(0)

    @property
    def capacity(self):
        return self.keys[0].size(2)

    def reserve(self, rows, length):
        """Room for rows [0, rows) of `length` positions each. When it must grow, the new buffers are exactly that
        size (rows beyond `rows` are free, and no active row is longer than `length`), so the cache is never
        larger than the scheduler's admission rule allows; what rows [0, rows) hold is kept."""
        if rows <= self.rows and length <= self.capacity:
            return
        keep_rows, keep_len = min(rows, self.rows), min(length, self.capacity)

        def grown(old):
            new = self._zeros(rows, length)
            new[:keep_rows, :, :keep_len] = old[:keep_rows, :, :keep_len]
            return new
        self.keys, self.values = [grown(k) for k in self.keys], [grown(v) for v in self.values]
        self.lengths = (self.lengths + [0] * rows)[:rows]

    def move_row(self, src, dst):
        n = self.lengths[src]
        for buffer in self.keys + self.values:
            buffer[dst, :, :n] = buffer[src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def begin(self, n, t, start=0, valid=None):
        """Rows [start, start + n) get t tokens each in the next forward: their positions, where their keys go,
        and the mask letting row b's query i see keys [0, lengths[b] + i]. (start > 0: prompts prefilled into
        fresh rows while the rows before them wait.) valid: per row, how many of the t tokens are real (prompts
        right-padded to t); a row's length then grows by that many only, so the padding's keys lie beyond it:
        masked out, then overwritten by the row's next tokens."""
        grow = list(valid) if valid is not None else [t] * n
        if len(grow) != n or not all(0 < g <= t for g in grow):
            raise ValueError(f"RowKVCache.begin: valid must give 1..{t} real tokens for each of the {n} rows, got {valid}")
        longest = max(self.lengths[start:start + n], default=0)
        if start + n > self.rows or longest + t > self.capacity:
            raise RuntimeError("RowKVCache.begin: the rows outgrew their reservation")
        H, T = self.num_kv_heads, self.capacity
        self._pos = torch.tensor(self.lengths[start:start + n], device=self.device)
        write = self._pos[:, None] + torch.arange(t, device=self.device)  # (n, t) positions written
        # row b, head h, token i goes to flat row (b * H + h) * T + write[b, i] of a layer's (rows * H * T, D)
        base = (torch.arange(start, start + n, device=self.device)[:, None] * H + torch.arange(H, device=self.device)) * T
        self._index = (base[:, :, None] + write[:, None, :]).reshape(-1)
        keys = torch.arange(longest + t, device=self.device)
        self.row_mask = keys[None, None, None, :] <= write[:, None, :, None]  # (n, 1, t, end)
        self._start = start
        for b, g in zip(range(start, start + n), grow):  # the lengths once the forward has written its keys
            self.lengths[b] += g

    def get_pos(self):
        return self._pos

    def insert_kv(self, layer_idx, k, v):
        """k, v: (n, H, t, D) for the rows begin() named; returns (n, H, end, D) views over those rows' positions
        so far (beyond a row's length: stale values, masked out)."""
        D = self.head_dim
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        # one index_copy_ each into the layer's keys and values seen as (rows * H * capacity, D) (contiguous)
        keys.view(-1, D).index_copy_(0, self._index, k.reshape(-1, D).to(self.dtype))
        values.view(-1, D).index_copy_(0, self._index, v.reshape(-1, D).to(self.dtype))
        # sizes from tensors, not Python ints, so that one compiled decode step serves every row count and length
        n, end = k.size(0), self.row_mask.size(-1)
        return keys.narrow(0, self._start, n)[:, :, :end], values.narrow(0, self._start, n)[:, :, :end]


@dataclass(eq=False)
class Request:
    """One generation. Arguments as Engine.generate (checked the same way); logprobs: None, or how many of
    the most likely alternatives to report with each token (0: only the token's own log-probability, from
    the model's distribution before temperature and filters)."""
    tokens: list
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    logprobs: int | None = None
    generated: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    cancelled: bool = False
    row: RowState = field(default_factory=RowState)
    rng: torch.Generator | None = None
    logits: torch.Tensor | None = None  # (1, V): where the next token comes from

    @property
    def reserved(self):
        return len(self.tokens) + self.max_tokens

    def cancel(self):
        """Safe from any thread: the request leaves at the start of the scheduler's next step."""
        self.cancelled = True


@dataclass
class Event:
    request: Request
    token: int
    sampled: bool  # False: forced (calculator output)
    logprob: float | None = None
    top_logprobs: list | None = None  # [(token, logprob)], most likely first


class BatchScheduler:
    """Decodes up to max_batch requests together (see the module docstring). Not thread-safe except
    Request.cancel(); one thread calls submit/step (the web server's worker thread)."""

    def __init__(self, engine, max_batch=8, max_cached_tokens=None):
        self.engine, self.model, self.max_batch = engine, engine.model, max_batch
        config = self.model.config
        self.max_cached_tokens = max_cached_tokens or max_batch * config.sequence_len
        weight = next(self.model.parameters())
        self.device = weight.device
        self.compute_dtype = get_compute_dtype(self.device.type)
        cache_dtype = weight.dtype if self.compute_dtype == torch.float32 else self.compute_dtype  # as Engine
        self.cache = RowKVCache(config.n_kv_head, config.head_dim, config.n_layer, cache_dtype, self.device)
        self.waiting, self.active = deque(), []  # active[b] holds cache row b
        self.on_first_tokens = None  # see step()

    def submit(self, tokens, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42, logprobs=None):
        """Queue a request (FIFO); ValueError for bad arguments or one that can never fit max_cached_tokens."""
        tokens, max_tokens, top_k, top_p, seed = self.engine._check_args(tokens, 1, max_tokens, temperature, top_k,
                                                                         top_p, seed)
        request = Request(tokens, max_tokens, float(temperature), top_k, top_p, seed, logprobs)
        if request.reserved > self.max_cached_tokens:
            raise ValueError(f"the request needs {request.reserved} cached tokens (prompt {len(tokens)} + max_tokens "
                             f"{max_tokens}), more than the replica's budget of {self.max_cached_tokens}")
        request.rng = torch.Generator(device=self.device).manual_seed(seed)
        if max_tokens == 0:
            request.finish_reason = "length"
        else:
            self.waiting.append(request)
        return request

    def warm_up(self):
        """With Engine(compile=True): compile the decode step now, not in the first users' requests, for each
        case torch.compile tells apart (a size of 1 is special to it): one row in a one-row cache, several rows,
        one row in a larger cache; a few requests of one token each, run to the end. Returns the seconds it
        took; None when there is nothing to compile or compiling failed, and then the engine decodes eagerly
        from now on (a warning says why). The scheduler is left empty."""
        if not self.engine.compile:
            return None
        try:
            with _COMPILING:
                t0 = time.perf_counter()
                for rows in (1, 2, 1) if self.max_batch > 1 else (1,):
                    for _ in range(rows):
                        self.submit([0], max_tokens=2, temperature=0.0)
                    while self.has_work():
                        self.step()
        except Exception as e:  # e.g. no C++ compiler for inductor: serve anyway, eagerly
            log.warning(f"the compiled decode step failed ({type(e).__name__}: {e}); decoding eagerly")
            self.engine.compile = False
            self.waiting.clear()
            self.active.clear()
            self.cache.lengths = [0] * len(self.cache.lengths)
            return None
        return time.perf_counter() - t0

    def has_work(self):
        return bool(self.waiting or self.active)

    @property
    def cached_tokens(self):
        return sum(self.cache.lengths[:len(self.active)])

    def _forward(self, ids, cache, model=None, **kwargs):
        with autocast_context(self.device.type, self.compute_dtype):
            return (model or self.model)(ids, kv_cache=cache, **kwargs)[:, -1, :]

    def _leave(self, request, reason):
        """Finish `request` and give its row to the last active request."""
        request.finish_reason, request.logits = reason, None
        b, last = self.active.index(request), len(self.active) - 1
        if b != last:
            self.cache.move_row(last, b)
            self.active[b] = self.active[last]
        else:
            self.cache.lengths[b] = 0
        self.active.pop()

    def _admit(self):
        """Waiting requests that fit, in order (the first that does not fit blocks the rest: no starvation),
        prefilled together: one forward over their prompts, right-padded to the longest, in fresh rows."""
        new = []
        while self.waiting and len(self.active) + len(new) < self.max_batch:
            request = self.waiting[0]
            if request.cancelled:
                self.waiting.popleft().finish_reason = "cancelled"
                continue
            rows = len(self.active) + len(new) + 1
            longest = max(r.reserved for r in self.active + new + [request])
            if rows * longest > self.max_cached_tokens:
                break
            self.waiting.popleft()
            self.cache.reserve(rows, longest)
            new.append(request)
        if not new:
            return
        lengths = [len(r.tokens) for r in new]
        t = max(lengths)
        ids = torch.tensor([r.tokens + [0] * (t - len(r.tokens)) for r in new], dtype=torch.long, device=self.device)
        self.cache.begin(len(new), t, start=len(self.active), valid=lengths)
        logits = self._forward(ids, self.cache, last_only=torch.tensor(lengths, device=self.device) - 1)
        for i, request in enumerate(new):
            request.logits = logits[i:i + 1]
        self.active += new

    @staticmethod
    def _next_tokens(requests):
        """Each request's next token from its own logits, requests with the same sampling settings sampled
        together (a handful of tensor ops per step instead of a dozen per request). Each row draws one uniform
        from its own generator, so it samples exactly what Engine.generate's sample_next_token samples alone
        (engine.draw; tests/test_batching.py checks the two agree)."""
        groups = {}
        for i, r in enumerate(requests):
            greedy = r.temperature < GREEDY_BELOW_TEMPERATURE
            groups.setdefault(None if greedy else (r.temperature, r.top_k, r.top_p), []).append(i)
        tokens = [0] * len(requests)
        for key, rows in groups.items():
            logits = torch.cat([requests[i].logits for i in rows])
            if key is None:
                picked = logits.argmax(dim=-1)
            else:
                probs, idx = filtered_probs(logits, *key)
                u = torch.cat([torch.rand(1, generator=requests[i].rng, device=probs.device) for i in rows])
                choice = draw(probs, u)
                picked = choice.squeeze(-1) if idx is None else idx.gather(-1, choice).squeeze(-1)
            for i, token in zip(rows, picked.tolist()):
                tokens[i] = token
        return tokens

    def _sample(self, requests):
        """Each request's next token (Events); finished requests are returned too, to leave once no forward
        needs the rows in place."""
        events, done = [], []
        for request, token in zip(requests, self._next_tokens(requests)):
            # sampled even when a calculator answer is forced, as Engine.generate does: the generator advances alike
            sampled = not request.row.forced
            if not sampled:
                token = request.row.forced.popleft()
            event = Event(request, token, sampled)
            if request.logprobs is not None:
                logp = F.log_softmax(request.logits[0].float(), dim=-1)
                event.logprob = float(logp[token])
                if request.logprobs:
                    top = torch.topk(logp, request.logprobs)
                    event.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
            events.append(event)
            self.engine._advance(request.row, token)
            request.generated += 1
            if request.row.done or request.generated >= request.max_tokens:
                done.append(request)
        return events, done

    @torch.no_grad()
    def step(self):
        """One scheduling step, as the module docstring describes; returns the tokens it produced, as Events
        (one per active request). With on_first_tokens set (a callable), the newly admitted requests' events
        go to it before the batch's decode forward, and are not in the list returned."""
        for request in [r for r in self.active if r.cancelled]:
            self._leave(request, "cancelled")
        old = len(self.active)  # rows [0, old) hold a token that the model has not seen yet
        self._admit()
        events, done = self._sample(self.active[old:])
        if events and self.on_first_tokens is not None:
            self.on_first_tokens(events)
            events = []
        if old:
            self.cache.begin(old, 1)
            ids = torch.tensor([[r.row.last] for r in self.active[:old]], device=self.device)  # each row's newest token
            logits = self._forward(ids, self.cache, model=self.engine._decoder() if self.engine.compile else None)
            for b, request in enumerate(self.active[:old]):
                request.logits = logits[b:b + 1]
            more, more_done = self._sample(self.active[:old])
            events, done = events + more, done + more_done
        for request in done:
            self._leave(request, "stop" if request.row.done else "length")
        return events
