"""
Inference: the key/value cache, sampling, and the Engine that streams tokens with calculator tool use.

    engine = Engine(model, tokenizer)
    for column, masks in engine.generate(prompt_ids, num_samples=4, max_tokens=256, temperature=0.8, top_k=50):
        ...                                   # column[i]: row i's next token; masks[i]: 1 sampled, 0 forced
    results, masks = engine.generate_batch(prompt_ids, num_samples=4, max_tokens=256)

How a generation runs: the prompt is prefilled ONCE at batch 1 into a KV cache, the cache is replicated
into num_samples rows, then every step feeds one token per row (batched single-token decode). Each row
is its own little state machine: it stops at <|assistant_end|> or <|bos|>, and the text it writes
between <|python_start|> and <|python_end|> goes to the calculator, whose answer is forced into that
row as <|output_start|> result <|output_end|> (one token per step, marked 0 = not sampled, and fed
through the model like any token so the cache stays consistent).
"""
import importlib
import threading
from collections import deque
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from nanochat.calculator import use_calculator
from nanochat.common import autocast_context, get_compute_dtype


class KVCache:
    """Preallocated keys and values: per layer, a (B, Hkv, T, D) tensor of keys and one of values.

    The model's attention calls insert_kv(layer_idx, k, v) with the new chunk's keys/values of shape
    (B, Hkv, t, D) and gets back views covering positions [0, pos + t) to attend over. The position
    advances AUTOMATICALLY when the last layer has inserted its chunk, so one model forward = one
    advance by t; get_pos() read before a forward is the position of the chunk's first token (the
    model offsets its rotary embeddings by it). When a sequence outruns the preallocated length the
    buffers grow (capacity doubles), so callers may size it for the common case.

    Each buffer is a tensor of its own, not a view of one shared tensor: torch.compile turns writes into
    views of one graph input's storage into a copy of the whole storage per step (a compiled decode step of
    one row took 1.1 ms with a 1-row cache and 24.5 ms with a 64-row one, docs/benchmarks.md); into tensors
    of their own it writes in place."""

    row_mask = None  # every row at the same position: attention needs no per-row mask (see batching.RowKVCache)

    def __init__(self, batch_size, num_kv_heads, seq_len, head_dim, num_layers, dtype=torch.float32, device="cpu"):
        for name, value in (("batch_size", batch_size), ("num_kv_heads", num_kv_heads), ("seq_len", seq_len),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.dtype, self.device = dtype, device
        self.keys, self.values = self._zeros(seq_len), self._zeros(seq_len)
        self.pos = 0

    def _zeros(self, seq_len):
        shape = (self.batch_size, self.num_kv_heads, seq_len, self.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]

    @property
    def capacity(self):
        return self.keys[0].size(2)

    def get_pos(self):
        return self.pos

    def reset(self):
        self.pos = 0

    def _ensure_capacity(self, needed):
        if needed <= self.capacity:
            return
        new_len = max(needed, 2 * self.capacity)
        keys, values = self._zeros(new_len), self._zeros(new_len)
        for bigger, old in zip(keys + values, self.keys + self.values):
            bigger[:, :, :self.pos] = old[:, :, :self.pos]
        self.keys, self.values = keys, values

    def insert_kv(self, layer_idx, k, v):
        """Write this chunk at [pos, pos + t) of layer `layer_idx`; return (keys, values) for [0, pos + t)."""
        B, H, t, D = k.shape
        if B != self.batch_size or H != self.num_kv_heads or D != self.head_dim:
            raise ValueError(f"KVCache: got keys of shape {tuple(k.shape)}, cache holds batch {self.batch_size}, "
                             f"{self.num_kv_heads} kv heads, head_dim {self.head_dim}")
        pos, end = self.pos, self.pos + t
        self._ensure_capacity(end)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.narrow(2, pos, t).copy_(k)
        values.narrow(2, pos, t).copy_(v)
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def prefill(self, other):
        """Copy a batch-1 cache (e.g. a prompt prefilled once) into every row of this cache."""
        if (other.num_layers, other.num_kv_heads, other.head_dim) != (self.num_layers, self.num_kv_heads, self.head_dim):
            raise ValueError("KVCache.prefill: caches differ in layers, kv heads or head_dim")
        if other.batch_size != 1 and other.batch_size != self.batch_size:
            raise ValueError(f"KVCache.prefill: source batch must be 1 or {self.batch_size}, got {other.batch_size}")
        self.pos = 0
        self._ensure_capacity(other.pos)
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[:, :, :other.pos] = theirs[:, :, :other.pos]  # broadcasts over the batch dim
        self.pos = other.pos

# -----------------------------------------------------------------------------
# Sampling


# Temperatures below this are greedy: sampling at them is argmax in all but exact ties, and dividing the
# logits by much smaller ones overflows float32 to inf (softmax then gives NaN).
GREEDY_BELOW_TEMPERATURE = 1e-4


def filtered_probs(logits, temperature, top_k=None, top_p=None):
    """(B, V) logits -> (probs, idx): float32 logits / temperature, then the top_k most likely tokens, then
    the smallest set of those whose probability reaches top_p (the most likely token always stays, however
    small top_p is); probs (B, K) sum to 1 over what is kept, idx (B, K) their token ids (None: K = V, the
    ids are the positions)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        vals, idx = torch.topk(logits, top_k, dim=-1)  # sorted, most likely first
    elif top_p is not None:
        vals, idx = torch.sort(logits, dim=-1, descending=True)
    else:
        return F.softmax(logits, dim=-1), None
    if top_p is not None:
        probs = F.softmax(vals, dim=-1)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p  # mass of the more likely tokens already reaches top_p
        drop[..., 0] = False  # (a top_p below float32's smallest number would drop the first one too)
        vals = vals.masked_fill(drop, float("-inf"))
    return F.softmax(vals, dim=-1), idx


def draw(probs, uniforms):
    """Inverse-CDF sampling: (B, K) probabilities and (B,) uniforms in [0, 1) -> (B, 1) indices, in each row the
    first whose cumulative probability exceeds the uniform times the row's total (an entry of probability 0 is
    never drawn). One random number per row: torch.multinomial draws an exponential per entry, which on a CPU
    cost 26.6 ms a step for 8 rows of a 65,536-token vocabulary (against 1.0 ms here; docs/benchmarks.md).
    The same uniforms give the same tokens whatever other rows are in the batch (rows are summed on their own)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    if not torch.isfinite(total).all():
        raise RuntimeError("sampling: the probabilities are not finite (the logits hold NaN or inf)")
    # strictly below the total, so that rounding of u * total cannot step past the last entry
    target = torch.minimum(uniforms.view(-1, 1).to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)


def sample_next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits -> (B,) token ids. A temperature below GREEDY_BELOW_TEMPERATURE (0 included) is greedy
    (argmax; top_k / top_p do not matter). Otherwise the probabilities of filtered_probs, drawn (draw()) with
    one uniform per row from `rng`, in row order."""
    if temperature < GREEDY_BELOW_TEMPERATURE:
        return logits.argmax(dim=-1)
    probs, idx = filtered_probs(logits, temperature, top_k, top_p)
    choice = draw(probs, torch.rand(probs.size(0), generator=rng, device=probs.device))
    return choice.squeeze(-1) if idx is None else idx.gather(-1, choice).squeeze(-1)


# Prompts whose greedy continuations base training and scripts.base_loss print: a quick look at what a
# base model knows (a fact, a symbol, a little reasoning, an opposite, a list).
SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:"]


@torch.no_grad()
def greedy_samples(model, tokenizer, prompts, max_tokens=16):
    """Greedy continuations by full recomputation: a handful of tokens, so no cache is needed."""
    outs = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        for _ in range(max_tokens):
            x = torch.tensor([ids[-model.config.sequence_len:]], device=model.get_device())
            ids.append(int(model(x)[0, -1].argmax()))
        outs.append(tokenizer.decode(ids[1:]))
    return outs

# -----------------------------------------------------------------------------
# Per-row state: stopping and the calculator


@dataclass(slots=True)
class RowState:
    """One sample's progress: done, the python expression being collected, tokens waiting to be forced."""
    done: bool = False
    last: int | None = None
    in_python: bool = False
    expr: list = field(default_factory=list)
    forced: deque = field(default_factory=deque)


class _CompileSettings:
    """Set torch.compile config values ({config module: {name: value}}) while any thread is inside (a count, so
    that one of several engine threads, e.g. the web server's GPU workers, leaving does not restore the old
    values under the others)."""
    _lock = threading.Lock()
    _inside = 0
    _saved = []

    def __init__(self, values):
        self.values = values

    def __enter__(self):
        with self._lock:
            if _CompileSettings._inside == 0:
                configs = [(importlib.import_module(name), values) for name, values in self.values.items()]
                _CompileSettings._saved = [(config, {k: getattr(config, k) for k in values}) for config, values in configs]
                for config, values in configs:
                    for k, v in values.items():
                        setattr(config, k, v)
            _CompileSettings._inside += 1

    def __exit__(self, *exc):
        with self._lock:
            _CompileSettings._inside -= 1
            if _CompileSettings._inside == 0:
                for config, saved in _CompileSettings._saved:
                    for k, v in saved.items():
                        setattr(config, k, v)


class Engine:
    """Generation for a GPT-like model (forward(idx, kv_cache=..., last_only=...) -> (B, T or 1, V) logits; .config
    with vocab_size, n_layer, n_kv_head, head_dim, sequence_len) and a nanochat Tokenizer. Special tokens the
    tokenizer lacks turn their feature off (no <|python_start|>: no tool use; no stop tokens: every row runs to
    max_tokens). The engine never changes the model; it generates on the model's device.

    compile=True runs the single-token decode step through torch.compile with inductor's "freezing" (weights
    become constants: prepacked for the CPU's matmul kernels, their casts to the compute dtype folded away) and,
    on CPU, the C++ wrapper (less Python per step): decode ~1.4-1.7x faster on CPU (docs/benchmarks.md), at the
    cost of a compilation (seconds to tens of seconds) at batch 1 and again at the first batch > 1, and a
    prepacked copy of the weights. For serving a fixed checkpoint: frozen weights must not change, so a model
    that trains (RL) needs compile=False (the engine raises if they did)."""

    def __init__(self, model, tokenizer, compile=False):
        self.model = model
        self.tokenizer = tokenizer
        self.compile = bool(compile)
        self._decode_model = None  # the compiled model, made on first use (compile=True)
        self._frozen_versions = None

        def special(name):  # None when the tokenizer lacks the token: then its feature is off
            try:
                return tokenizer.encode_special(name)
            except (ValueError, KeyError):
                return None
        self.stop_tokens = frozenset(t for t in (special("<|assistant_end|>"), special("<|bos|>")) if t is not None)
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.tools = None not in (self.python_start, self.python_end, self.output_start, self.output_end)

    # --- arguments ---------------------------------------------------------

    def _check_args(self, tokens, num_samples, max_tokens, temperature, top_k, top_p, seed):
        """Validated (tokens, max_tokens, top_k, top_p, seed); a clear ValueError otherwise."""
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)
        tokens = list(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
        vocab = self.model.config.vocab_size
        if not tokens:
            raise ValueError("generate: the prompt is empty (give at least one token, e.g. <|bos|>)")
        for t in tokens:
            if not (is_int(t) and 0 <= t < vocab):
                raise ValueError(f"generate: prompt token {t!r} is not an id in [0, {vocab})")
        if not is_int(num_samples) or num_samples <= 0:
            raise ValueError(f"generate: num_samples must be a positive int, got {num_samples!r}")
        if max_tokens is None:  # until every row is done, at most up to the model's context length
            max_tokens = max(1, self.model.config.sequence_len - len(tokens))
        elif not is_int(max_tokens) or max_tokens < 0:
            raise ValueError(f"generate: max_tokens must be a non-negative int or None, got {max_tokens!r}")
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature < float("inf"):
            raise ValueError(f"generate: temperature must be a finite number >= 0, got {temperature!r}")
        if top_k is not None and (not is_int(top_k) or top_k < 0):
            raise ValueError(f"generate: top_k must be a positive int or None, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1):
            raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p!r}")
        if not is_int(seed):
            raise ValueError(f"generate: seed must be an int, got {seed!r}")
        # top_k 0 and top_p 1 mean "no filter"
        return tokens, max_tokens, (top_k or None), (None if top_p == 1 else top_p), seed % 2**64

    # --- generation --------------------------------------------------------

    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Stream num_samples continuations of the prompt `tokens` (a list of ids). Yields, once per step,
        (token_column, token_masks): lists of length num_samples with each row's next token and 1 if it was
        sampled, 0 if it was forced (calculator output). A row's terminal token (<|assistant_end|> or
        <|bos|>) is yielded once, with mask 1; after that the row is done and, while other rows go on,
        its entry repeats that terminal token with mask 0 (consumers skip done rows). The generator ends
        when every row is done or after max_tokens steps (None: up to the model's context length).
        Greedy at temperature 0; seeded: the same arguments give the same tokens. Arguments are checked
        here (ValueError) before anything runs. Closing the generator early frees its KV cache.

        For speed, wrap the loop in nanochat.common.autocast_context (as the web server does): the
        weights' casts to the compute dtype are then cached across steps; each step enters autocast itself,
        so it is correct without."""
        tokens, max_tokens, top_k, top_p, seed = self._check_args(tokens, num_samples, max_tokens, temperature,
                                                                  top_k, top_p, seed)
        return self._generate(tokens, num_samples, max_tokens, float(temperature), top_k, top_p, seed)

    # no_grad rather than inference_mode: under inference_mode autocast does not cache the weights' casts
    # (measured: fp32 weights + bf16 autocast decode ~1.6x slower), and a rotary table the model extends
    # here must stay usable by a training step (RL). On a generator the decorator is active while it runs,
    # not while it is suspended at a yield, so nothing leaks into the caller's code.
    @torch.no_grad()
    def _generate(self, tokens, num_samples, max_tokens, temperature, top_k, top_p, seed):
        if max_tokens == 0:
            return
        model, config = self.model, self.model.config
        weight = next(model.parameters())
        device = weight.device
        compute_dtype = get_compute_dtype(device.type)
        # keys/values come out in the compute dtype under autocast, else in the weights' dtype
        cache_dtype = weight.dtype if compute_dtype == torch.float32 else compute_dtype
        rng = torch.Generator(device=device).manual_seed(seed)
        decode_model = self._decoder() if self.compile else model

        def forward(net, ids, cache, **kwargs):
            with autocast_context(device.type, compute_dtype):
                return net(ids, kv_cache=cache, **kwargs)[:, -1, :]

        # prefill the prompt once at batch 1, then replicate it into num_samples rows. Room for a reply of
        # up to the context length is preallocated; a longer one grows the cache (doubling) as it goes.
        new_cache = partial(KVCache, num_kv_heads=config.n_kv_head, head_dim=config.head_dim, num_layers=config.n_layer,
                            dtype=cache_dtype, device=device)
        capacity = len(tokens) + min(max_tokens, config.sequence_len)
        cache = new_cache(1, seq_len=capacity if num_samples == 1 else len(tokens))
        logits = forward(model, torch.tensor([tokens], dtype=torch.long, device=device), cache, last_only=True)
        if num_samples > 1:
            prompt_cache, cache = cache, new_cache(num_samples, seq_len=capacity)
            cache.prefill(prompt_cache)
            del prompt_cache
            logits = logits.expand(num_samples, -1)

        rows = [RowState() for _ in range(num_samples)]
        try:
            for step in range(max_tokens):
                sampled = sample_next_token(logits, rng, temperature, top_k, top_p)
                column, masks, any_forced = sampled.tolist(), [1] * num_samples, False
                for i, row in enumerate(rows):
                    if row.done:
                        column[i], masks[i] = row.last, 0
                        continue
                    if row.forced:
                        column[i], masks[i], any_forced = row.forced.popleft(), 0, True
                    self._advance(row, column[i])
                yield column, masks
                if step + 1 == max_tokens or all(row.done for row in rows):
                    return
                # done rows are fed whatever they "sampled": their cache rows are never read again
                ids = torch.tensor(column, dtype=torch.long, device=device) if any_forced else sampled
                logits = forward(decode_model, ids.view(num_samples, 1), cache)
        finally:
            del cache, logits  # on close(): free the cache now, not at garbage collection

    def _decoder(self):
        """The compiled model for decode steps (compile=True), built once; checks the frozen weights are
        still the model's (an in-place update, e.g. an optimizer step or load_state_dict, bumps a
        tensor's version counter)."""
        versions = [p._version for p in self.model.parameters()]
        if self._decode_model is None:
            # dynamic: one graph for every cache length (and every batch size > 1)
            compiled = torch.compile(self.model, dynamic=True)
            # torch.compile(options={"freezing": True}) is not honored (torch 2.13: measured, the weights stay
            # graph inputs), so the inductor config is set around each call, which is also when a
            # (re)compilation happens; a global setting would also freeze other no_grad graphs, e.g. a
            # compiled training model's evaluation, whose weights do change.
            # Duck shaping off: sizes that happen to be equal when a graph is traced (e.g. 2 rows, 2 cached
            # positions) would be tied by a guard, and a server would recompile mid-stream once they differ.
            cpu = next(self.model.parameters()).device.type == "cpu"
            settings = _CompileSettings({"torch._inductor.config": dict(freezing=True, cpp_wrapper=cpu),
                                         "torch.fx.experimental._config": dict(use_duck_shape=False)})

            def decode_model(*args, **kwargs):
                with settings:
                    return compiled(*args, **kwargs)
            self._decode_model = decode_model
            self._frozen_versions = versions
        elif versions != self._frozen_versions:
            raise RuntimeError("Engine(compile=True) froze the model's weights into its compiled decode step, and "
                               "they have changed since (a training step or load_state_dict?); use compile=False "
                               "for a model that trains, or build a new Engine after a new checkpoint is loaded")
        return self._decode_model

    def _advance(self, row, token):
        """Update a row after `token` was appended: stop, collect a python expression, or queue the
        calculator's answer. A refused or failing expression gives no output; generation just goes on."""
        row.last = token
        if token in self.stop_tokens:
            row.done = True
        elif not self.tools:
            return
        elif token == self.python_start:
            row.in_python, row.expr = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            result = use_calculator(self.tokenizer.decode(row.expr))
            row.expr = []
            if result is not None:
                row.forced.extend([self.output_start, *self.tokenizer.encode(result), self.output_end])
        elif row.in_python:
            row.expr.append(token)

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42):
        """All of generate() at once: (results, masks), one list per row. results[i] = prompt + the row's
        generated tokens (forced calculator outputs inline, the terminal token not included); masks[i] = 0
        for every prompt token, then per generated token 1 if sampled, 0 if forced."""
        tokens = list(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens)
        gen = self.generate(tokens, num_samples, max_tokens, temperature, top_k, top_p, seed)
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        device_type = next(self.model.parameters()).device.type
        # one autocast around the whole loop: the weight casts are cached across steps
        with autocast_context(device_type, get_compute_dtype(device_type)):
            for column, column_masks in gen:
                for i, (token, mask) in enumerate(zip(column, column_masks)):
                    if token not in self.stop_tokens:  # a row's terminal token, repeated once it is done
                        results[i].append(token)
                        masks[i].append(mask)
        return results, masks
