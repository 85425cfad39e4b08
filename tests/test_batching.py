"""
Continuous batching (nanochat/batching.py): in fp32 every request's tokens are what Engine.generate gives it
alone (greedy and seeded sampling), whatever joins or leaves around it: staggered arrivals, rows of very
different lengths, cancellations, calculator calls; the cache stays within its token budget and the queue
is FIFO.
"""
import random

import pytest
import torch
import torch.nn as nn

from nanochat.batching import BatchScheduler
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")  # bf16 rounding differs with the batch size


class NoSpecials:
    """A tokenizer without special tokens: the engine then stops only at max_tokens."""

    def encode_special(self, name):
        raise KeyError(name)


@pytest.fixture(scope="module")
def random_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from the zero-init identity, so outputs depend on the whole context
    return model


def alone(engine, prompt, **kw):
    """The reference: the request run by itself through Engine.generate."""
    out = []
    for column, _ in engine.generate(prompt, num_samples=1, **kw):
        out.append(column[0])
    return out


def run(scheduler, arrivals, cancel_at=None):
    """arrivals: [(step, prompt, kwargs)]; cancel_at: {arrival index: step}. Returns (requests, tokens per request,
    the largest number of requests active at once)."""
    requests, tokens, step, peak = [None] * len(arrivals), {}, 0, 0
    cancel_at = cancel_at or {}
    while step <= max(s for s, _, _ in arrivals) or scheduler.has_work():
        for i, (s, prompt, kw) in enumerate(arrivals):
            if s == step:
                requests[i] = scheduler.submit(prompt, **kw)
        for i, s in cancel_at.items():
            if s == step:
                requests[i].cancel()
        for event in scheduler.step():
            tokens.setdefault(id(event.request), []).append(event.token)
        peak = max(peak, len(scheduler.active))
        assert scheduler.cache.rows * scheduler.cache.capacity <= scheduler.max_cached_tokens
        step += 1
    return requests, [tokens.get(id(r), []) for r in requests], peak


def prompts_of(seed, n, longest=60):
    rng = random.Random(seed)
    return [[rng.randrange(300) for _ in range(rng.choice([1, 3, longest // 2, longest]))] for _ in range(n)]


def test_greedy_matches_alone_with_staggered_arrivals(random_gpt):
    engine = Engine(random_gpt, NoSpecials())
    for seed in range(4):
        prompts = prompts_of(seed, 7)
        arrivals = [(2 * i, p, dict(max_tokens=[5, 20, 12][i % 3], temperature=0.0)) for i, p in enumerate(prompts)]
        requests, got, peak = run(BatchScheduler(engine, max_batch=4), arrivals)
        assert peak == 4  # the batch really filled up
        for (_, prompt, kw), tokens, request in zip(arrivals, got, requests):
            assert tokens == alone(engine, prompt, **kw)
            assert request.finish_reason == "length" and request.generated == kw["max_tokens"]


def test_seeded_sampling_is_per_request(random_gpt):
    engine = Engine(random_gpt, NoSpecials())
    settings = [dict(temperature=0.9, top_k=20, seed=1), dict(temperature=1.3, top_p=0.8, seed=2),
                dict(temperature=0.7, seed=3), dict(temperature=0.0, seed=4), dict(temperature=1.0, top_k=5, top_p=0.9, seed=5)]
    prompts = prompts_of(7, len(settings))
    arrivals = [(i, p, dict(max_tokens=15, **kw)) for i, (p, kw) in enumerate(zip(prompts, settings))]
    _, got, _ = run(BatchScheduler(engine, max_batch=8), arrivals)
    for (_, prompt, kw), tokens in zip(arrivals, got):
        assert tokens == alone(engine, prompt, **kw)
    # the same request again, in a different crowd, gives the same tokens
    _, again, _ = run(BatchScheduler(engine, max_batch=2), list(reversed(arrivals)))
    assert list(reversed(again)) == got


def test_cancelled_requests_leave_at_once_and_free_their_row(random_gpt):
    engine = Engine(random_gpt, NoSpecials())
    prompts = prompts_of(3, 6)
    arrivals = [(0, prompts[0], dict(max_tokens=30, temperature=0.0)), (0, prompts[1], dict(max_tokens=30, temperature=0.0)),
                (1, prompts[2], dict(max_tokens=30, temperature=0.0)), (2, prompts[3], dict(max_tokens=10, temperature=0.0)),
                (5, prompts[4], dict(max_tokens=10, temperature=0.0))]
    scheduler = BatchScheduler(engine, max_batch=3)
    requests, got, peak = run(scheduler, arrivals, cancel_at={1: 3, 3: 3})  # #3 is cancelled while still waiting
    assert requests[1].finish_reason == "cancelled" and len(got[1]) == 3
    assert requests[3].finish_reason == "cancelled" and got[3] == []
    for i in (0, 2, 4):
        assert got[i] == alone(engine, arrivals[i][1], **arrivals[i][2])
    assert peak == 3 and scheduler.cache.rows <= 3


@pytest.mark.slow  # three compilations, ~1 min on 2 cores: run with pytest -m slow
def test_compiled_decode_step_gives_the_eager_tokens(random_gpt):
    """Engine(compile=True): warm_up() compiles the batch's decode forward up front, its sizes read from tensors
    (rows, the longest row's length), so three graphs (one row in a one-row cache, several rows, one row in a
    larger cache) serve every row count and length: no compilation after warm-up while requests of different
    lengths join, leave and are cancelled; and the greedy tokens are the eager scheduler's. Another worker's
    scheduler warming up at the same time in another thread (a replica per device in one process) adds no graph:
    compiled at once, the two left one worker on a fourth graph built without the engine's settings."""
    import threading
    from torch._dynamo.utils import counters
    prompts = prompts_of(11, 6)
    arrivals = [(2 * i, p, dict(max_tokens=[6, 18, 11][i % 3], temperature=0.0)) for i, p in enumerate(prompts)]
    _, want, _ = run(BatchScheduler(Engine(random_gpt, NoSpecials()), max_batch=3), arrivals, cancel_at={2: 5})
    compiled = BatchScheduler(Engine(random_gpt, NoSpecials(), compile=True), max_batch=3)
    other = BatchScheduler(Engine(random_gpt, NoSpecials(), compile=True), max_batch=1)
    torch._dynamo.reset()  # graphs an earlier test compiled for a model of this shape would serve it too
    graphs = counters["stats"]["unique_graphs"]
    seconds = {}
    threads = [threading.Thread(target=lambda s=s: seconds.update({s.max_batch: s.warm_up()})) for s in (compiled, other)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seconds[3] > 0 and seconds[1] > 0 and not compiled.has_work() and compiled.cached_tokens == 0
    assert counters["stats"]["unique_graphs"] - graphs == 3
    requests, got, peak = run(compiled, arrivals, cancel_at={2: 5})
    assert got == want and peak == 3 and requests[2].finish_reason == "cancelled"
    assert counters["stats"]["unique_graphs"] - graphs == 3


def test_a_failing_compiled_step_falls_back_to_eager(random_gpt, monkeypatch, caplog):
    engine = Engine(random_gpt, NoSpecials(), compile=True)

    def broken():
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(engine, "_decoder", broken)
    scheduler = BatchScheduler(engine, max_batch=2)
    assert scheduler.warm_up() is None and not engine.compile and not scheduler.has_work()
    assert "no C++ compiler" in caplog.text and "decoding eagerly" in caplog.text
    prompt = prompts_of(12, 1)[0]
    _, got, _ = run(scheduler, [(0, prompt, dict(max_tokens=8, temperature=0.0))])
    assert got[0] == alone(Engine(random_gpt, NoSpecials()), prompt, max_tokens=8, temperature=0.0)


class ScriptedBigram(nn.Module):
    """A model whose next token depends only on the current one (a lookup table), with the attention-cache
    bookkeeping of a real one: it inserts (zero) keys into whatever cache it is given, so positions advance."""

    def __init__(self, vocab_size, table):
        super().__init__()
        self.config = GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=2)
        logits = torch.full((vocab_size, vocab_size), -10.0)
        for src in range(vocab_size):
            logits[src, table.get(src, src)] = 10.0
        self.register_buffer("table", logits)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, kv_cache=None, last_only=False):
        B, T = idx.shape
        if kv_cache is not None:
            kv_cache.get_pos()
            zeros = torch.zeros(B, 1, T, 2)
            kv_cache.insert_kv(0, zeros, zeros)
        out = self.table[idx] + 0 * self.dummy
        if isinstance(last_only, torch.Tensor):  # ragged prompts, right-padded: each row's own last token
            return out[torch.arange(B), last_only].unsqueeze(1)
        return out[:, -1:] if last_only else out


def test_calculator_calls_per_row(tokenizer):
    """Rows that call the calculator at different times each get their own forced answer; a plain row next
    to them is untouched. The script: START -> <|python_start|> 12+30 <|python_end|> (the engine forces
    <|output_start|>42<|output_end|>) -> <|assistant_end|>."""
    special = tokenizer.encode_special
    expr = tokenizer.encode("12+30")
    start, other = tokenizer.encode("Hello")[-1], tokenizer.encode(" world")[-1]
    chain = [start, special("<|python_start|>"), *expr, special("<|python_end|>")]
    table = dict(zip(chain, chain[1:]))
    table[special("<|output_end|>")] = special("<|assistant_end|>")
    table[other] = other  # a plain row repeats itself until max_tokens
    assert len(set(chain)) == len(chain) and other not in chain
    engine = Engine(ScriptedBigram(tokenizer.get_vocab_size(), table), tokenizer)
    arrivals = [(0, [start], dict(max_tokens=40, temperature=0.0)), (0, [other], dict(max_tokens=25, temperature=0.0)),
                (3, [start], dict(max_tokens=40, temperature=0.0)), (5, [start], dict(max_tokens=6, temperature=0.0))]
    requests, got, _ = run(BatchScheduler(engine, max_batch=4), arrivals)
    answer = [special("<|output_start|>"), *tokenizer.encode("42"), special("<|output_end|>")]
    expected = chain[1:] + answer + [special("<|assistant_end|>")]
    assert got[0] == expected and got[2] == expected and requests[0].finish_reason == "stop"
    assert got[1] == [other] * 25 and requests[1].finish_reason == "length"
    assert got[3] == expected[:6] and requests[3].finish_reason == "length"
    for (_, prompt, kw), tokens in zip(arrivals, got):
        assert tokens == alone(engine, prompt, **kw)


def test_token_budget_fifo_and_refusal(random_gpt):
    engine = Engine(random_gpt, NoSpecials())
    scheduler = BatchScheduler(engine, max_batch=8, max_cached_tokens=120)
    with pytest.raises(ValueError, match="budget of 120"):
        scheduler.submit([1] * 100, max_tokens=21)
    # 30-token reservations: 4 fit at once; then a 100-token one must wait for the row count to drop to one,
    # and the small ones behind it wait too (FIFO: nothing overtakes it, so it cannot starve)
    prompts = prompts_of(11, 7, longest=20)
    arrivals = [(0, [1] * 10, dict(max_tokens=20, temperature=0.0)) for _ in range(5)]
    arrivals += [(0, [2] * 60, dict(max_tokens=40, temperature=0.0)), (0, prompts[0][:10], dict(max_tokens=20, temperature=0.0))]
    admitted = []
    original = scheduler._admit

    def spy():
        before = set(map(id, scheduler.active))
        original()
        admitted.extend(r for r in scheduler.active if id(r) not in before)
    scheduler._admit = spy
    requests, got, peak = run(scheduler, arrivals)
    assert peak == 4
    assert [requests.index(r) for r in admitted] == list(range(7))
    for (_, prompt, kw), tokens in zip(arrivals, got):
        assert tokens == alone(engine, prompt, **kw)


def test_logprobs(random_gpt):
    engine = Engine(random_gpt, NoSpecials())
    scheduler = BatchScheduler(engine, max_batch=2)
    request = scheduler.submit([5, 6, 7], max_tokens=4, temperature=0.0, logprobs=3)
    events = []
    while scheduler.has_work():
        events += scheduler.step()
    with torch.no_grad():
        tokens = [5, 6, 7]
        for event in events:
            logp = torch.log_softmax(random_gpt(torch.tensor([tokens]))[0, -1].float(), -1)
            assert event.token == int(logp.argmax()) and abs(event.logprob - float(logp.max())) < 1e-4
            assert [t for t, _ in event.top_logprobs] == torch.topk(logp, 3).indices.tolist()
            tokens.append(event.token)
    assert request.finish_reason == "length"


def test_batched_sampling_draws_what_each_request_draws_alone():
    """The scheduler samples rows with equal settings together; each row's token and its generator's state
    afterwards are what sample_next_token gives the row alone, for every filter."""
    from types import SimpleNamespace
    from nanochat.engine import sample_next_token
    settings = [(1.0, None, None), (0.7, 20, None), (1.3, None, 0.8), (0.9, 5, 0.5), (0.0, None, None), (1.0, 300, None)]
    torch.manual_seed(0)
    for trial in range(10):
        rows = [SimpleNamespace(logits=torch.randn(1, 300) * 3, temperature=t, top_k=k, top_p=p,
                                rng=torch.Generator().manual_seed(100 * trial + i))
                for i, (t, k, p) in enumerate(settings * 2)]
        alone_rngs = [torch.Generator().manual_seed(100 * trial + i) for i in range(len(rows))]
        got = BatchScheduler._next_tokens(rows)
        want = [int(sample_next_token(r.logits, g, r.temperature, r.top_k, r.top_p)) for r, g in zip(rows, alone_rngs)]
        assert got == want
        assert all(torch.equal(r.rng.get_state(), g.get_state()) for r, g in zip(rows, alone_rngs))


def test_first_tokens_go_out_before_the_batch_forward(random_gpt):
    """With on_first_tokens set, a newly admitted request's first token is handed to it right after the
    request's own prefill, before the decode forward of the requests already running, and is not returned
    again; every request's tokens are still what it gets alone."""
    engine = Engine(random_gpt, NoSpecials())
    scheduler = BatchScheduler(engine, max_batch=4)
    forwards, early, returned = [], [], {}
    original = scheduler._forward

    def counting(ids, cache, **kw):
        forwards.append(tuple(ids.shape))
        return original(ids, cache, **kw)
    scheduler._forward = counting
    scheduler.on_first_tokens = lambda events: early.append((list(forwards), events))
    prompts = [[(7 * i + j) % 300 for j in range(5 + 2 * i)] for i in range(3)]  # prefills are (1, 5+), decodes (n, 1)
    kw = dict(max_tokens=6, temperature=0.0)
    requests, step = [], 0
    while step < 3 or scheduler.has_work():
        if step < 3:
            requests.append(scheduler.submit(prompts[step], **kw))
        for event in scheduler.step():
            returned.setdefault(id(event.request), []).append(event.token)
        step += 1
    assert len(early) == 3
    for i, (seen, events) in enumerate(early):
        assert [e.request for e in events] == [requests[i]]
        # its own prefill is the last forward so far; the decode of this step's running requests comes after
        # (step i has run i - 1 decodes before it: none at steps 0 and 1)
        assert seen[-1] == (1, len(prompts[i])) and sum(t == 1 for _, t in seen) == max(i - 1, 0)
    for i, (request, (_, events)) in enumerate(zip(requests, early)):
        tokens = [events[0].token] + returned[id(request)]
        assert tokens == alone(engine, prompts[i], **kw) and request.finish_reason == "length"


@pytest.mark.parametrize("window_pattern", ["L", "SL"])
def test_admitted_prompts_prefill_together(random_gpt, window_pattern):
    """Requests admitted in the same step are prefilled in one forward, right-padded to the longest prompt
    (lengths 1 to 60 here), straight into their rows: each row's logits come from its own last token and the
    padding's keys never reach it, so every request's greedy tokens are still what it gets alone, also with a
    sliding window (window 16 < the prompts) and with rows already decoding before them."""
    model = random_gpt
    if window_pattern != "L":
        torch.manual_seed(1)
        model = GPT(GPTConfig(sequence_len=32, vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                              window_pattern=window_pattern))  # layer 0 sees 16 positions back
        model.init_weights()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
    engine = Engine(model, NoSpecials())
    scheduler = BatchScheduler(engine, max_batch=8, max_cached_tokens=1000)
    forwards = []
    original = scheduler._forward

    def spy(ids, cache, **kw):
        forwards.append(tuple(ids.shape))
        return original(ids, cache, **kw)
    scheduler._forward = spy
    prompts = [[(11 * i + j) % 300 for j in range(n)] for i, n in enumerate([1, 60, 7, 33, 2])]
    kw = dict(max_tokens=12, temperature=0.0)
    arrivals = [(0, prompts[0], kw), (0, prompts[1], kw), (2, prompts[2], kw), (2, prompts[3], kw), (2, prompts[4], kw)]
    _, got, peak = run(scheduler, arrivals)
    assert peak == 5 and forwards[0] == (2, 60) and (3, 33) in forwards  # two ragged prefills, one per arrival step
    assert sum(1 for b, t in forwards if t > 1) == 2
    for (_, prompt, kw_), tokens in zip(arrivals, got):
        assert tokens == alone(engine, prompt, **kw_)
