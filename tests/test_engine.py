"""Inference engine: KV-cache decoding equals full recomputation, sampling (greedy, seeds, top-k, top-p),
per-row stopping, the calculator tool-use state machine, cache growth and clean-up. Tiny random GPTs and
a byte-level tokenizer (every byte one token, then the special tokens): no shared data needed."""
import weakref

import pytest
import torch
import torch.nn as nn

import nanochat.engine as engine_module
from nanochat.calculator import use_calculator
from nanochat.engine import Engine, KVCache, draw, sample_next_token
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    """Exact comparisons, and token ids above 256 stored exactly in the scripted models' caches."""
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp32")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer({bytes([i]): i for i in range(256)}, {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})


def tiny_gpt(vocab_size, n_kv_head=4, sequence_len=64, seed=0):
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.manual_seed(seed)
    with torch.no_grad():  # the zero-initialized projections and head would make every logit equal
        for p in model.parameters():
            if p.dim() == 2 and not p.any():
                p.normal_(0, 0.3)
    return model.eval()


def greedy_by_recompute(model, prompt, n, stops):
    """Reference: a full forward over the whole sequence for every new token, no cache."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids]))[0, -1].argmax())
            if t in stops:
                break
            ids.append(t)
    return ids


# -----------------------------------------------------------------------------
# cache vs recomputation


@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["MHA", "GQA"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_greedy_with_cache_equals_full_recompute(tok, n_kv_head, num_samples):
    model = tiny_gpt(tok.get_vocab_size(), n_kv_head=n_kv_head)
    engine = Engine(model, tok)
    prompt = [tok.get_bos_token_id()] + tok.encode("The cat sat on")
    want = greedy_by_recompute(model, prompt, 30, engine.stop_tokens)
    results, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=30, temperature=0.0)
    assert len(want) > len(prompt) + 5, "the reference should generate a non-trivial continuation"
    assert results == [want] * num_samples
    assert masks == [[0] * len(prompt) + [1] * (len(want) - len(prompt))] * num_samples


def test_decoding_past_the_context_length_and_rotary_table(tok):
    """sequence_len 4: rotary tables cover 40 positions; 60 tokens must still match recomputation, and the
    model must still train afterwards (the extended tables are ordinary tensors, as RL needs)."""
    model = tiny_gpt(tok.get_vocab_size(), sequence_len=4, seed=3)
    engine = Engine(model, tok)
    engine.stop_tokens = frozenset()  # run the full length whatever the random model says
    prompt = tok.encode("ab")
    results, _ = engine.generate_batch(prompt, max_tokens=60, temperature=0.0)
    assert results[0] == greedy_by_recompute(model, prompt, 60, set())
    loss = model(torch.tensor([results[0][:-1]]), torch.tensor([results[0][1:]]))
    loss.backward()
    assert model.lm_head.weight.grad is not None


def test_compiled_decode_equals_eager_and_guards_frozen_weights(tok):
    """compile=True (inductor freezing + C++ wrapper on CPU) gives the eager engine's greedy tokens at
    batch 1 and batch > 1, and refuses to run once the frozen weights changed in place."""
    model = tiny_gpt(tok.get_vocab_size(), n_kv_head=2, seed=5)
    eager, compiled = Engine(model, tok), Engine(model, tok, compile=True)
    for engine in (eager, compiled):
        engine.stop_tokens = frozenset()  # full length: every step compared
    prompt = [tok.get_bos_token_id()] + tok.encode("2 + 2 =")
    for num_samples in (1, 2):
        want, _ = eager.generate_batch(prompt, num_samples=num_samples, max_tokens=20, temperature=0.0)
        got, _ = compiled.generate_batch(prompt, num_samples=num_samples, max_tokens=20, temperature=0.0)
        assert got == want
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="froze the model's weights"):
        compiled.generate_batch(prompt, max_tokens=5, temperature=0.0)
    eager.generate_batch(prompt, max_tokens=5, temperature=0.0)  # the eager engine does not care


def test_inductor_settings_restored_only_when_the_last_user_leaves():
    import torch._inductor.config as config
    before = config.freezing
    settings = {"torch._inductor.config": dict(freezing=not before)}
    a, b = engine_module._CompileSettings(settings), engine_module._CompileSettings(settings)
    with a:
        assert config.freezing == (not before)
        b.__enter__()  # a second engine thread enters, then the first leaves
    assert config.freezing == (not before)
    b.__exit__(None, None, None)
    assert config.freezing == before


def test_replicated_prefill_equals_independent_prefills():
    model = tiny_gpt(101, n_kv_head=2)
    c = model.config
    prompt = torch.randint(0, 101, (1, 9), generator=torch.Generator().manual_seed(0))
    nxt = torch.tensor([[5], [17], [99]])
    with torch.no_grad():
        one = KVCache(1, c.n_kv_head, 9, c.head_dim, c.n_layer)
        model(prompt, kv_cache=one)
        many = KVCache(3, c.n_kv_head, 16, c.head_dim, c.n_layer)
        many.prefill(one)
        for mine, theirs in zip(many.keys + many.values, one.keys + one.values):
            assert torch.equal(mine[:, :, :9], theirs[:, :, :9].expand(3, -1, -1, -1))
        got = model(nxt, kv_cache=many)[:, -1]
        for i in range(3):
            own = KVCache(1, c.n_kv_head, 16, c.head_dim, c.n_layer)
            model(prompt, kv_cache=own)
            want = model(nxt[i:i + 1], kv_cache=own)[:, -1]
            torch.testing.assert_close(got[i:i + 1], want, atol=1e-5, rtol=1e-5)


class Recording(nn.Module):
    """Wraps a model and records the shape of every forward."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.shapes = model, model.config, []

    def forward(self, idx, kv_cache=None, last_only=False):
        self.shapes.append((*idx.shape, "last") if last_only else tuple(idx.shape))
        return self.inner(idx, kv_cache=kv_cache, last_only=last_only)


def test_one_prefill_at_batch_one_then_batched_decode(tok):
    model = Recording(tiny_gpt(tok.get_vocab_size()))
    engine = Engine(model, tok)
    engine.stop_tokens = frozenset()
    list(engine.generate(list(range(10)), num_samples=4, max_tokens=6, temperature=1.0))
    # the prompt's head runs on its last position only; the 6th token needs no forward after it
    assert model.shapes == [(1, 10, "last")] + [(4, 1)] * 5


def test_kv_cache_grows_and_keeps_its_content():
    cache = KVCache(2, 3, 4, 8, 2)  # room for 4 positions
    keys = torch.randn(2, 3, 11, 8)
    with torch.no_grad():
        for t in range(11):
            for layer in range(2):
                k, v = cache.insert_kv(layer, keys[:, :, t:t + 1] + layer, -keys[:, :, t:t + 1])
    assert cache.get_pos() == 11 and cache.capacity >= 11
    torch.testing.assert_close(k, keys + 1, rtol=0, atol=0)  # last layer's view covers every position
    torch.testing.assert_close(cache.keys[0][:, :, :11], keys, rtol=0, atol=0)
    torch.testing.assert_close(cache.values[1][:, :, :11], -keys, rtol=0, atol=0)


def test_cache_buffers_are_tensors_of_their_own():
    """Every layer's keys and values, in both caches and after they grow, are tensors of their own, not views of
    one storage: a compiled decode step copies the whole storage of a graph input it writes through a view
    (a 1-row step grew from 1.1 to 24.5 ms with a 64-row cache; docs/benchmarks.md)."""
    from nanochat.batching import RowKVCache
    kv = KVCache(2, 3, 4, 8, 5)
    rows = RowKVCache(3, 8, 5, torch.float32, "cpu")
    rows.reserve(2, 4)
    for cache, grow in ((kv, lambda: kv._ensure_capacity(9)), (rows, lambda: rows.reserve(4, 9))):
        for _ in range(2):
            buffers = cache.keys + cache.values
            assert len(buffers) == 10 and len({b.untyped_storage().data_ptr() for b in buffers}) == 10
            assert all(b._base is None for b in buffers)
            grow()


def test_cache_dtype_follows_the_compute_dtype(tok, monkeypatch):
    seen = []

    class Spy(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.keys[0].dtype)

    monkeypatch.setattr(engine_module, "KVCache", Spy)
    engine = Engine(tiny_gpt(tok.get_vocab_size()), tok)
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    engine.generate_batch([1, 2, 3], num_samples=2, max_tokens=3, temperature=0.0)
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp32")
    engine.generate_batch([1, 2, 3], num_samples=2, max_tokens=3, temperature=0.0)
    assert seen == [torch.bfloat16] * 2 + [torch.float32] * 2

# -----------------------------------------------------------------------------
# sampling


def test_seeds_reproduce_and_differ(tok):
    engine = Engine(tiny_gpt(tok.get_vocab_size()), tok)
    engine.stop_tokens = frozenset()
    prompt = tok.encode("Hello")
    a = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=1)
    b = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=1)
    c = engine.generate_batch(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=2)
    assert a == b and a[0] != c[0]
    assert len({tuple(r) for r in a[0]}) > 1, "rows sample independently"
    streamed = [col for col, _ in engine.generate(prompt, num_samples=4, max_tokens=16, temperature=1.0, seed=1)]
    assert [prompt + [col[i] for col in streamed] for i in range(4)] == a[0]


def test_greedy_ignores_filters_and_top_k_1_is_greedy(tok):
    engine = Engine(tiny_gpt(tok.get_vocab_size()), tok)
    prompt = tok.encode("Once")
    greedy = engine.generate_batch(prompt, max_tokens=12, temperature=0.0)
    assert engine.generate_batch(prompt, max_tokens=12, temperature=0.0, top_k=3, top_p=0.1, seed=5) == greedy
    assert engine.generate_batch(prompt, max_tokens=12, temperature=1.5, top_k=1, seed=9) == greedy
    assert engine.generate_batch(prompt, max_tokens=12, temperature=1.5, top_p=1e-6, seed=9) == greedy


def test_numeric_extremes_sample_instead_of_crashing(tok):
    """Values that pass validation but broke sampling: a temperature so small that logits / temperature
    overflows (now greedy below GREEDY_BELOW_TEMPERATURE), a top_p that is 0 in float32, bf16 logits."""
    engine = Engine(tiny_gpt(tok.get_vocab_size()), tok)
    prompt = tok.encode("Once")
    greedy = engine.generate_batch(prompt, max_tokens=8, temperature=0.0)
    for kw in (dict(temperature=1e-300), dict(temperature=5e-324, top_p=1e-46), dict(temperature=1.0, top_p=1e-46),
               dict(temperature=1e-300, top_k=1)):
        assert engine.generate_batch(prompt, max_tokens=8, seed=3, **kw) == greedy, kw
    logits = (torch.randn(3, 50) * 30).to(torch.bfloat16)
    rng = torch.Generator().manual_seed(0)
    for t in (1e-3, 1.0, 1e30):  # just above the greedy threshold, plain, and so hot that all logits are ~0
        ids = sample_next_token(logits, rng, temperature=t, top_p=1e-46)
        assert ids.tolist() == logits.float().argmax(-1).tolist() or t == 1e30
        assert ((0 <= sample_next_token(logits, rng, temperature=t, top_k=5)) & (ids < 50)).all()


def test_top_k_and_top_p_restrict_the_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, -1)  # 4000 independent draws in one call
    rng = torch.Generator().manual_seed(0)

    def support(**kw):
        return set(sample_next_token(logits, rng, **kw).tolist())

    assert support(temperature=1.0) == {0, 1, 2, 3}
    assert support(temperature=1.0, top_k=2) == {0, 1}
    assert support(temperature=1.0, top_p=0.7) == {0, 1}        # 0.5 < 0.7 <= 0.8
    assert support(temperature=1.0, top_p=0.5) == {0}           # the first token alone reaches 0.5
    assert support(temperature=1.0, top_p=0.81) == {0, 1, 2}
    assert support(temperature=1.0, top_k=3, top_p=0.99) == {0, 1, 2}
    assert support(temperature=0.0, top_k=3) == {0}
    # frequencies follow the renormalized distribution: top_k=2 -> 0.5/0.8 = 0.625 for token 0
    draws = sample_next_token(logits, rng, temperature=1.0, top_k=2)
    assert abs((draws == 0).float().mean().item() - 0.625) < 0.03


def test_draw_follows_the_distribution_with_one_uniform_per_row():
    """engine.draw: over 20,000 rows the frequencies are the probabilities and an entry of probability 0 is never
    drawn; the uniforms 0 and the largest float32 below 1 give the first and the last possible entry (rounding
    cannot step past it); probabilities that are not finite are an error, not a token."""
    probs = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    got = draw(probs.expand(20000, -1), torch.rand(20000, generator=torch.Generator().manual_seed(1))).squeeze(-1)
    freq = torch.bincount(got, minlength=6).float() / 20000
    assert freq[[0, 2, 5]].sum() == 0 and (freq - probs).abs().max() < 0.015
    assert draw(probs.expand(2, -1), torch.tensor([0.0, 1 - 2 ** -24])).squeeze(-1).tolist() == [1, 4]
    with pytest.raises(RuntimeError, match="not finite"):
        draw(torch.tensor([[0.5, float("nan")]]), torch.tensor([0.3]))


def test_argument_errors_are_raised_at_call_time(tok):
    engine = Engine(tiny_gpt(tok.get_vocab_size()), tok)
    V = tok.get_vocab_size()
    bad = [dict(tokens=[]), dict(tokens=[V]), dict(tokens=[-1]), dict(tokens=[1.5]), dict(num_samples=0),
           dict(max_tokens=-1), dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=-2),
           dict(top_p=0.0), dict(top_p=1.5), dict(seed=1.0)]
    for kw in bad:
        args = dict(tokens=[1, 2], num_samples=1, max_tokens=4) | kw
        with pytest.raises(ValueError, match="generate"):
            engine.generate(**args)  # no next(): the check runs before the generator starts
        with pytest.raises(ValueError, match="generate"):
            engine.generate_batch(**args)
    assert list(engine.generate([1, 2], max_tokens=0)) == []
    assert engine.generate_batch([1, 2], num_samples=2, max_tokens=0) == ([[1, 2]] * 2, [[0, 0]] * 2)

# -----------------------------------------------------------------------------
# scripted models: per-row stopping and tool use


class ScriptedModel(nn.Module):
    """A fake GPT whose next token is a function of each row's whole history. The history comes from the
    KV cache itself (token ids stored as 1-d "keys"), so the engine's prefill, replication and per-row
    feeding are exercised. `script(history) -> token id or dict {token: logit}`."""

    def __init__(self, vocab_size, script):
        super().__init__()
        # head_dim 1 (not a valid GPT, never validated): the cache stores one number per token
        self.config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=1)
        self.script = script
        self.anchor = nn.Parameter(torch.zeros(()))  # device and dtype of the "weights"

    def forward(self, idx, kv_cache=None, last_only=False):
        ids = idx.to(torch.float32)[:, None, :, None]  # (B, 1, T, 1)
        history, _ = kv_cache.insert_kv(0, ids, ids)
        B, T = idx.shape
        logits = torch.full((B, T, self.config.vocab_size), -1e9)
        for b in range(B):
            out = self.script([int(x) for x in history[b, 0, :, 0].tolist()])
            for t, value in (out.items() if isinstance(out, dict) else [(out, 0.0)]):
                logits[b, -1, t] = value
        return logits


def test_rows_stop_independently(tok):
    end, bos = tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()
    a = ord("a")
    prompt = [bos, a]
    # after two tokens, uniform over {a, <|assistant_end|>, <|bos|>}: rows end at different steps
    model = ScriptedModel(tok.get_vocab_size(), lambda h: a if len(h) < 4 else {a: 0.0, end: 0.0, bos: 0.0})
    engine = Engine(model, tok)
    columns = list(engine.generate(prompt, num_samples=8, max_tokens=200, temperature=1.0, seed=0))
    assert len(columns) < 200, "generation ends once every row is done"
    lengths = set()
    for i in range(8):
        tokens = [col[i] for col, _ in columns]
        masks = [m[i] for _, m in columns]
        stop = next(k for k, t in enumerate(tokens) if t in (end, bos))
        assert tokens[stop + 1:] == [tokens[stop]] * (len(tokens) - stop - 1), "a done row repeats its terminal token"
        assert masks == [1] * (stop + 1) + [0] * (len(tokens) - stop - 1)
        lengths.add(stop)
    assert len(lengths) > 1
    assert any(t == bos for col, _ in columns for t in col), "<|bos|> stops a row too"
    results, masks = engine.generate_batch(prompt, num_samples=8, max_tokens=200, temperature=1.0, seed=0)
    for i, (r, m) in enumerate(zip(results, masks)):
        assert r[:2] == prompt and all(t == a for t in r[2:]) and len(r) - 2 in lengths
        assert m == [0, 0] + [1] * (len(r) - 2)


def tool_script(tok, expression):
    """The model writes <|python_start|>expression<|python_end|>, then "!" and <|assistant_end|>. While a
    tool output is open it predicts "X": only the engine's forcing can produce the real output."""
    s = tok.encode_special
    ps, pe, os_, oe, end = (s(n) for n in ("<|python_start|>", "<|python_end|>", "<|output_start|>",
                                            "<|output_end|>", "<|assistant_end|>"))
    call = [ps, *tok.encode(expression), pe]
    a_start = s("<|assistant_start|>")

    def script(history):
        reply = history[history.index(a_start) + 1:]
        if len(reply) < len(call):
            return call[len(reply)]
        if os_ in reply and oe not in reply:
            return ord("X")
        after = reply[len(call):]
        if after and after[0] == os_:
            after = after[after.index(oe) + 1:]
        return [ord("!"), end][min(len(after), 1)]
    return script, call


def test_tool_use_forces_exactly_the_calculator_output(tok):
    s = tok.encode_special
    prompt = tok.render_for_completion([{"role": "user", "content": "what is 2+3?"}])
    script, call = tool_script(tok, "2+3")
    engine = Engine(ScriptedModel(tok.get_vocab_size(), script), tok)
    forced = [s("<|output_start|>"), *tok.encode("5"), s("<|output_end|>")]
    results, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=50, temperature=1.0)
    reply = call + forced + [ord("!")]
    assert results == [prompt + reply] * 2
    assert masks == [[0] * len(prompt) + [1] * len(call) + [0] * len(forced) + [1]] * 2
    columns = list(engine.generate(prompt, max_tokens=50, temperature=0.0))
    assert [c[0] for c, _ in columns] == reply + [s("<|assistant_end|>")]
    assert [m[0] for _, m in columns] == [1] * len(call) + [0] * len(forced) + [1, 1]
    # a longer result, decoded exactly as the calculator printed it
    script, call = tool_script(tok, "1,000 * 3.5 / 7")
    engine = Engine(ScriptedModel(tok.get_vocab_size(), script), tok)
    results, masks = engine.generate_batch(prompt, max_tokens=50, temperature=0.0)
    out = results[0][len(prompt) + len(call):]
    assert tok.decode(out[1:out.index(s("<|output_end|>"))]) == use_calculator("1,000 * 3.5 / 7") == "500"


@pytest.mark.parametrize("expression", ["__import__('os').system('true')", "2**100000", "1/0", "foo"])
def test_refused_expression_gives_no_output_and_generation_goes_on(tok, expression):
    assert use_calculator(expression) is None
    prompt = tok.render_for_completion([{"role": "user", "content": "hi"}])
    script, call = tool_script(tok, expression)
    engine = Engine(ScriptedModel(tok.get_vocab_size(), script), tok)
    results, masks = engine.generate_batch(prompt, max_tokens=50, temperature=0.0)
    assert results[0] == prompt + call + [ord("!")]
    assert masks[0] == [0] * len(prompt) + [1] * (len(call) + 1)


def test_without_tool_tokens_the_engine_just_samples():
    """A tokenizer without our special tokens: no stops, no tools; rows run to max_tokens."""
    class Bare:
        def encode_special(self, name):
            raise ValueError(name)
    engine = Engine(tiny_gpt(300), Bare())
    assert not engine.tools and engine.stop_tokens == frozenset()
    results, _ = engine.generate_batch([1, 2, 3], num_samples=2, max_tokens=7, temperature=1.0)
    assert [len(r) for r in results] == [10, 10]

# -----------------------------------------------------------------------------
# clean-up


def test_close_frees_the_cache_and_leaks_no_grad_mode(tok, monkeypatch):
    caches = []

    class Tracked(KVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(weakref.ref(self))

    monkeypatch.setattr(engine_module, "KVCache", Tracked)
    engine = Engine(tiny_gpt(tok.get_vocab_size()), tok)
    engine.stop_tokens = frozenset()
    gen = engine.generate([1, 2, 3], num_samples=2, max_tokens=100, temperature=1.0)
    next(gen)
    assert torch.is_grad_enabled(), "no_grad is active only while the generator runs"
    next(gen)
    assert any(ref() is not None for ref in caches)
    gen.close()  # frees at once, without waiting for the garbage collector
    assert caches and all(ref() is None for ref in caches)
