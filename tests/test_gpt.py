"""GPT model: parameter counts, config validation, causality, KV cache, tying, training, compile."""
import math
import time

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig, config_for_depth


def build(config, device="cpu", randomize=True, seed=0):
    """Meta-device build + init; `randomize` also gives the zero-initialized matrices random values
    so every path through the network (c_proj, lm_head) affects the logits."""
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    if randomize:
        with torch.no_grad():
            for p in model.parameters():
                if (p == 0).all():
                    p.normal_(0, 0.5 / math.sqrt(p.size(-1)))
    return model


def tiny(**kw):
    base = dict(sequence_len=32, vocab_size=101, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def meta_params(config):
    with torch.device("meta"):
        return GPT(config).num_params_by_group()


def closed_form(c):
    """Parameter count written out independently of the model code."""
    hd = c.n_embd // c.n_head
    hidden = max(64, 64 * math.floor(c.mlp_ratio * c.n_embd / 64 + 0.5))
    attn = c.n_embd * c.n_embd * 2 + 2 * c.n_embd * c.n_kv_head * hd  # q, proj, k, v
    mlp = 2 * c.n_embd * hidden
    emb = c.vocab_size * c.n_embd
    return c.n_layer * (attn + mlp) + emb * (1 if c.tie_embeddings else 2)


# -----------------------------------------------------------------------------
# parameter counts (meta device: instant even at depth 20)

def test_reference_param_count_and_savings():
    ref = GPTConfig()
    assert ref.n_layer == 20 and ref.n_embd == 1280 and ref.n_head == 10 and ref.vocab_size == 65536
    g = meta_params(ref)
    assert g["total"] == 560_988_160
    assert g == dict(embedding=83_886_080, head=83_886_080, attention=131_072_000, mlp=262_144_000, value_embeds=0,
                     scalars=0, total=560_988_160, scaling=131_072_000 + 262_144_000 + 83_886_080)
    assert g["total"] - meta_params(GPTConfig(tie_embeddings=True))["total"] == 83_886_080
    assert g["total"] - meta_params(GPTConfig(mlp_ratio=3.0))["total"] == 65_536_000
    assert g["total"] - meta_params(GPTConfig(n_kv_head=2))["total"] == 52_428_800
    assert config_for_depth(20, 65536) == ref


@pytest.mark.parametrize("kw", [
    dict(),
    dict(tie_embeddings=True),
    dict(mlp_ratio=3.0),
    dict(mlp_ratio=2.5, n_kv_head=5),
    dict(n_kv_head=2, tie_embeddings=True, activation="silu"),
    dict(n_layer=12, n_embd=768, n_head=6, n_kv_head=3, vocab_size=50304, mlp_ratio=3.0),
    dict(n_layer=2, n_embd=48, n_head=3, n_kv_head=1, vocab_size=97, mlp_ratio=2.0),
])
def test_param_counts_closed_form(kw):
    c = GPTConfig(**kw)
    assert meta_params(c)["total"] == closed_form(c)


def test_mlp_hidden_dim_rounding():
    assert GPTConfig().mlp_hidden_dim == 5120
    assert GPTConfig(mlp_ratio=3.0).mlp_hidden_dim == 3840
    assert GPTConfig(mlp_ratio=2.5).mlp_hidden_dim == 3200
    assert GPTConfig(n_embd=320, n_head=5, n_kv_head=5, mlp_ratio=2.5).mlp_hidden_dim == 832  # 800 -> nearest 64
    assert GPTConfig(n_embd=16, n_head=2, n_kv_head=2, mlp_ratio=1.0).mlp_hidden_dim == 64  # floor of 64


def test_estimate_flops_formula():
    c = GPTConfig()
    n_matmul = 131_072_000 + 262_144_000 + 83_886_080
    assert GPT.estimate_flops(_meta(c)) == 6 * n_matmul + 12 * 20 * 10 * 128 * 2048
    # the tied head still does the head matmul: same FLOPs
    assert _meta(GPTConfig(tie_embeddings=True)).estimate_flops() == _meta(c).estimate_flops()


def _meta(c):
    with torch.device("meta"):
        return GPT(c)


# -----------------------------------------------------------------------------
# config validation

@pytest.mark.parametrize("kw, field", [
    (dict(n_embd=30), "n_embd"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(n_embd=36, n_head=12, n_kv_head=12), "n_head"),  # head_dim 3 is odd
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(sequence_len=0), "sequence_len"),
    (dict(n_head=2.5), "n_head"),
    (dict(mlp_ratio=0), "mlp_ratio"),
    (dict(activation="swish"), "activation"),
    (dict(softcap=-1.0), "softcap"),
    (dict(rope_base=0), "rope_base"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
])
def test_config_errors(kw, field):
    with pytest.raises(ValueError, match=field):
        GPT(tiny(**kw))


def test_config_for_depth():
    c = config_for_depth(7, 1000, sequence_len=256, n_kv_head=1, mlp_ratio=3.0)
    assert c.n_embd == 448 and c.n_embd % c.n_head == 0 and c.n_kv_head == 1 and c.sequence_len == 256
    assert config_for_depth(2, 100).n_head == 1
    with pytest.raises(ValueError, match="n_embd"):
        config_for_depth(4, 100, n_embd=3)
    with pytest.raises(ValueError, match="depth"):
        config_for_depth(0, 100)


def test_model_flags_round_trip(capsys):
    """add_model_flags + config_from_flags: the defaults are the reference plus the 2026 recipe's value embeddings
    (the reference itself with --value-embeds=false); every flag that is not part
    of the sizing rule lands in the GPTConfig field of its name; a config's flags written back out and
    parsed again give the same config; --kv-head-ratio rounds down to a divisor of n_head; bad values
    are errors that name the flag."""
    from nanochat.common import make_parser
    from nanochat.recipe import MODEL_FLAGS, SIZING_FLAGS, add_model_flags, config_from_flags, model_flags
    p = make_parser(None)
    assert tuple(add_model_flags(p)) == MODEL_FLAGS
    assert config_from_flags(p.parse_args([]), 65536) == GPTConfig(vocab_size=65536, value_embeds=True)
    assert config_from_flags(p.parse_args(["--value-embeds=false"]), 65536) == config_for_depth(20, 65536) == \
        GPTConfig(vocab_size=65536)
    args = p.parse_args(["--depth=8", "--head-dim=64", "--max-seq-len=512", "--mlp-ratio=2.5", "--activation=gelu",
                         "--tie-embeddings", "--kv-head-ratio=3", "--softcap=0", "--rope-base=50000"])
    c = config_from_flags(args, 512)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.sequence_len, c.vocab_size) == (8, 512, 8, 2, 512, 512)
    for name in set(MODEL_FLAGS) - set(SIZING_FLAGS) - {"softcap"}:
        assert getattr(c, name) == getattr(args, name), name
    assert c.softcap is None  # 0 = off, stored as None
    argv = [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in vars(args).items()]
    assert config_from_flags(p.parse_args(argv), 512) == c
    # the kv-head rule: n_head // ratio rounded down to a divisor (depth 28: 14 heads // 4 = 3 -> 2);
    # an explicit --n-kv-head wins over the ratio
    assert config_from_flags(model_flags(depth=28, kv_head_ratio=4), 65536).n_kv_head == 2
    assert config_from_flags(model_flags(n_kv_head=5, kv_head_ratio=4), 65536).n_kv_head == 5
    with pytest.raises(ValueError, match="n_kv_head"):
        config_from_flags(model_flags(n_kv_head=3), 65536)
    # no --depth where the caller sweeps depths; defaults replaced by dest; unknown names are errors
    q = make_parser(None)
    assert add_model_flags(q, with_depth=False, head_dim=64) == list(MODEL_FLAGS[1:])
    assert q.parse_args([]).head_dim == 64 and "depth" not in vars(q.parse_args([]))
    with pytest.raises(ValueError, match="n_embd"):
        add_model_flags(make_parser(None), n_embd=128)
    with pytest.raises(ValueError, match="n_embd"):
        model_flags(n_embd=128)
    for bad, flag in (("--n-kv-head=-1", "--n-kv-head"), ("--softcap=-1", "--softcap"), ("--mlp-ratio=0", "--mlp-ratio"),
                      ("--rope-base=0", "--rope-base"), ("--activation=relu", "--activation"), ("--depth=0", "--depth"),
                      ("--window-pattern=SX", "--window-pattern"), ("--value-embeds=maybe", "--value-embeds")):
        with pytest.raises(SystemExit):
            p.parse_args([bad])
        assert flag in capsys.readouterr().err


def test_planned_changes():
    """One declaration of the first user's planned changes: each alone over the reference, contexts
    as fractions of the reference context, "all together" the marked ones merged."""
    from nanochat.recipe import MODEL_FLAGS, PLANNED_CHANGES, planned_changes
    rows = planned_changes(2048, context_label="seq")
    assert [label for label, _ in rows] == ["tied embeddings", "seq 1024", "seq 512", "MLP 3x", "MLP 2.5x",
                                             "n_kv_head = n_head // 4", "GELU", "SiLU", "softcap off",
                                             "RoPE base 100000", "all together"]
    assert len(rows) == len(PLANNED_CHANGES) + 1 and all(set(change) <= set(MODEL_FLAGS) for _, change in rows)
    assert rows[-1] == ("all together", dict(tie_embeddings=True, max_seq_len=1024, mlp_ratio=3.0, n_kv_head=0,
                                             kv_head_ratio=4, activation="silu", softcap=0.0, rope_base=100000.0))
    assert dict(planned_changes(256))["context 64"] == dict(max_seq_len=64)


# -----------------------------------------------------------------------------
# forward semantics

def test_init_weights_reference_scheme():
    torch.manual_seed(0)
    m = build(tiny(vocab_size=2000, n_embd=64), randomize=False)
    assert (m.lm_head.weight == 0).all()
    for b in m.transformer.h:
        assert (b.attn.c_proj.weight == 0).all() and (b.mlp.c_proj.weight == 0).all()
        assert abs(b.attn.c_q.weight.std().item() - 64 ** -0.5) < 0.02
    assert abs(m.transformer.wte.weight.std().item() - 1.0) < 0.05
    idx = torch.randint(0, 2000, (2, 8))
    assert torch.allclose(m(idx), torch.zeros(1))  # zero head: uniform predictions at init
    t = build(tiny(vocab_size=2000, n_embd=64, tie_embeddings=True), randomize=False)
    assert t.lm_head is None and abs(t.transformer.wte.weight.std().item() - 64 ** -0.75) < 0.005
    logits = t(idx)
    # the input token's own logit is ~n_embd**0.25, the rest ~0: near-uniform predictions at init
    self_logit = logits.gather(-1, idx[..., None]).squeeze(-1)
    assert (self_logit - 64 ** 0.25).abs().max() < 1.0 and logits.std() < 0.5


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_causality(n_kv_head):
    m = build(tiny(n_kv_head=n_kv_head))
    idx = torch.randint(0, 101, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 101
    a, b = m(idx), m(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert (a[:, 9:] - b[:, 9:]).abs().amax(dim=-1).min() > 1e-4


def test_loss_reductions_and_ignore_index():
    m = build(tiny())
    idx = torch.randint(0, 101, (2, 12))
    tgt = torch.randint(0, 101, (2, 12))
    tgt[0, :5] = -1
    per_tok = m(idx, tgt, loss_reduction="none")
    assert per_tok.shape == (2, 12) and (per_tok[0, :5] == 0).all()
    from_logits = F.cross_entropy(m(idx).view(-1, 101), tgt.view(-1), ignore_index=-1, reduction="none")
    torch.testing.assert_close(per_tok, from_logits.view(2, 12), atol=1e-5, rtol=1e-5)
    valid = tgt != -1
    assert torch.allclose(m(idx, tgt, loss_reduction="sum"), per_tok.sum(), rtol=1e-5)
    assert torch.allclose(m(idx, tgt), per_tok.sum() / valid.sum(), rtol=1e-5)
    with pytest.raises(ValueError, match="loss_reduction"):
        m(idx, tgt, loss_reduction="avg")


@pytest.mark.parametrize("cap", [15.0, 50.0, 0.0])  # constant-shift and logsumexp branches, no cap
@pytest.mark.parametrize("compiled", [False, True])  # eager in-place path / the exp form traced by dynamo
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_cross_entropy_matches_reference(dtype, compiled, cap):
    from nanochat.kernels import SoftcapCrossEntropy
    torch.manual_seed(0)
    z = (torch.randn(64, 50) * 20).to(dtype)
    z[0, :5] = torch.tensor([1e4, -1e4, 700.0, -700.0, 0.0])  # extreme logits: finite loss and gradient
    tgt = torch.randint(0, 50, (64,))
    tgt[3] = -1
    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    fn = lambda z, t: SoftcapCrossEntropy.apply(z, t, cap)
    if compiled:
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    z_before = z.clone()
    ours = fn(a, tgt)
    capped = cap * torch.tanh(b.float() / cap) if cap else b.float()
    ref = F.cross_entropy(capped, tgt, ignore_index=-1, reduction="none")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(64)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.isfinite(a.grad.float()).all() and (a.grad[3] == 0).all()
    assert torch.equal(a.detach(), z_before)  # the input logits are not modified in place
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)


@pytest.mark.parametrize("cap", [15.0, 0.0])
@pytest.mark.parametrize("mode", ["eager", "compiled", "bf16"])
def test_chunked_head_loss_matches_reference(monkeypatch, mode, cap):
    """The head matmul + summed (softcapped) cross-entropy in chunks of rows, gradients computed in the
    forward: same loss and gradients (x and the weight) as the composed reference, with a chunk size that
    does not divide the tokens, ignored targets, and no gradient work under no_grad."""
    import nanochat.kernels as kernels
    monkeypatch.setattr(kernels, "HEAD_CHUNK_ROWS", 7)
    torch.manual_seed(0)
    x0, w0 = torch.randn(30, 16), torch.randn(50, 16) * 2
    tgt = torch.randint(0, 50, (30,))
    tgt[[2, 9, 29]] = -1
    x, w, xr, wr = (t.clone().requires_grad_() for t in (x0, w0, x0, w0))
    fn = lambda x, w: kernels.ChunkedHeadLoss.apply(x, w, tgt, cap, torch.is_grad_enabled())
    if mode == "compiled":
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        ours = fn(x, w)
        logits = F.linear(xr, wr).float()
    ref = F.cross_entropy(cap * torch.tanh(logits / cap) if cap else logits, tgt, ignore_index=-1, reduction="sum")
    (3.0 * ours).backward()
    (3.0 * ref).backward()
    tol = dict(atol=1e-4, rtol=1e-5) if mode != "bf16" else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(w.grad, wr.grad, **tol)
    assert x.grad.dtype == w.grad.dtype == torch.float32 and (x.grad[[2, 9, 29]] == 0).all()
    monkeypatch.setattr(kernels, "_logit_grads", lambda *a: pytest.fail("gradients computed under no_grad"))
    with torch.no_grad():
        torch.testing.assert_close(kernels.ChunkedHeadLoss.apply(x0, w0, tgt, cap, torch.is_grad_enabled()), ref.detach(), **tol)


@pytest.mark.parametrize("n_kv_head", [4, 2])  # MHA and GQA
def test_kv_cache_prefill_and_decode_match_full_forward(n_kv_head):
    cfg = tiny(n_kv_head=n_kv_head)
    m = build(cfg)
    idx = torch.randint(0, 101, (2, 24))
    full = m(idx)
    # cache deliberately shorter than the sequence: it must grow
    cache = KVCache(2, n_kv_head, 8, cfg.head_dim, cfg.n_layer)
    pieces = [m(idx[:, :6], kv_cache=cache)]             # prefill into an empty cache
    pieces.append(m(idx[:, 6:13], kv_cache=cache))       # a chunk after existing cache content
    assert cache.get_pos() == 13
    for t in range(13, 24):                              # single-token decode
        pieces.append(m(idx[:, t:t + 1], kv_cache=cache))
    assert cache.get_pos() == 24 and cache.capacity >= 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_only_logits():
    cfg = tiny(n_kv_head=2)
    m = build(cfg)
    idx = torch.randint(0, 101, (2, 12))
    full = m(idx)
    torch.testing.assert_close(m(idx, last_only=True), full[:, -1:], atol=1e-6, rtol=1e-6)
    cache = KVCache(2, 2, 16, cfg.head_dim, cfg.n_layer)  # the engine's prefill: into a cache
    torch.testing.assert_close(m(idx, kv_cache=cache, last_only=True), full[:, -1:], atol=1e-5, rtol=1e-5)
    assert cache.get_pos() == 12
    with pytest.raises(ValueError, match="last_only"):
        m(idx, targets=idx, last_only=True)
    # one position per row (ragged prompts, right-padded): row b's logits at its own last token
    at = torch.tensor([4, 11])
    torch.testing.assert_close(m(idx, last_only=at), full[torch.arange(2), at].unsqueeze(1), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="last_only"):
        m(idx, targets=idx, last_only=at)


def test_kv_cache_beyond_rotary_table():
    cfg = tiny(sequence_len=4)  # rotary tables cover 40 positions; decode further
    m = build(cfg)
    idx = torch.randint(0, 101, (1, 50))
    cache = KVCache(1, cfg.n_kv_head, 16, cfg.head_dim, cfg.n_layer)
    out = [m(idx[:, :30], kv_cache=cache)] + [m(idx[:, t:t + 1], kv_cache=cache) for t in range(30, 50)]
    torch.testing.assert_close(torch.cat(out, 1), m(idx), atol=1e-5, rtol=1e-5)


def test_kv_cache_prefill_batch1_into_batch():
    cfg = tiny(n_kv_head=2)
    m = build(cfg)
    prompt = torch.randint(0, 101, (1, 10))
    one = KVCache(1, 2, 16, cfg.head_dim, cfg.n_layer)
    m(prompt, kv_cache=one)
    many = KVCache(3, 2, 4, cfg.head_dim, cfg.n_layer)  # smaller: prefill must grow it
    many.prefill(one)
    assert many.get_pos() == 10
    nxt = torch.tensor([[5], [17], [99]])
    got = m(nxt, kv_cache=many)[:, -1]
    want = m(torch.cat([prompt.expand(3, -1), nxt], dim=1))[:, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    many.reset()
    assert many.get_pos() == 0


def test_kv_cache_errors():
    with pytest.raises(ValueError, match="num_layers"):
        KVCache(1, 2, 8, 8, 0)
    cache = KVCache(2, 2, 8, 8, 1)
    with pytest.raises(ValueError, match="kv heads"):
        cache.insert_kv(0, torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8))
    with pytest.raises(ValueError, match="source batch"):
        cache.prefill(KVCache(3, 2, 8, 8, 1))


def test_eval_no_grad_and_inference_mode():
    m = build(tiny()).eval()
    idx = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        a = m(idx)
    with torch.inference_mode():
        b = m(idx)
    assert not a.requires_grad and torch.equal(a, b)


def test_bf16_autocast_cpu():
    m = build(tiny(n_kv_head=2))
    idx = torch.randint(0, 101, (2, 12))
    ref = m(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(idx)
        cache = KVCache(2, 2, 16, 8, 2, dtype=torch.bfloat16)
        dec = torch.cat([m(idx[:, :6], kv_cache=cache)] + [m(idx[:, t:t + 1], kv_cache=cache) for t in range(6, 12)], 1)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert (dec - out).abs().max() < 0.1 * ref.abs().max()


# -----------------------------------------------------------------------------
# gradients and training

def test_tied_matrix_gets_gradient_from_both_uses():
    tied = build(tiny(tie_embeddings=True))
    untied = build(tiny())
    sd = {k: v for k, v in tied.state_dict().items()}
    sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    untied.load_state_dict(sd)
    idx = torch.randint(0, 50, (2, 12))  # tokens < 50 only: rows >= 50 get no embedding gradient
    tgt = torch.randint(0, 101, (2, 12))
    tied(idx, tgt).backward()
    untied(idx, tgt).backward()
    g_emb, g_head = untied.transformer.wte.weight.grad, untied.lm_head.weight.grad
    assert g_emb[:50].abs().sum() > 0 and g_head.abs().sum() > 0
    torch.testing.assert_close(tied.transformer.wte.weight.grad, g_emb + g_head, atol=1e-6, rtol=1e-5)
    assert tied.transformer.wte.weight.grad[:50].sub(g_head[:50]).abs().sum() > 0  # embedding use counted


def _train(model, steps, batch):
    opts = model.setup_optimizers()
    x, y = batch
    losses = []
    for _ in range(steps):
        loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kw", [
    dict(activation="relu2", softcap=15.0),
    dict(activation="gelu", softcap=0),
    dict(activation="silu", softcap=None),
    dict(activation="relu2", softcap=None, tie_embeddings=True),
    dict(activation="gelu", softcap=15.0, tie_embeddings=True, n_kv_head=1),
])
def test_each_setting_trains(kw):
    torch.manual_seed(0)
    model = build(tiny(**kw), randomize=False)  # the real init: training must work from it
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, 101, (4, 32), generator=g), torch.randint(0, 101, (4, 32), generator=g))
    losses = _train(model, 25, batch)
    assert losses[0] == pytest.approx(math.log(101), abs=1.0)
    assert losses[-1] < 0.6 * losses[0], losses


def test_setup_optimizers_groups():
    from nanochat.optim import AdamW, Muon
    m = build(tiny(n_embd=64), randomize=False)
    adamw, muon = m.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.1)
    assert isinstance(adamw, AdamW) and isinstance(muon, Muon)
    scale = (64 / 768) ** -0.5
    assert [g["lr"] for g in adamw.param_groups] == pytest.approx([0.004 * scale, 0.2 * scale])
    assert all(g["initial_lr"] == g["lr"] for o in (adamw, muon) for g in o.param_groups)
    assert muon.param_groups[0]["lr"] == 0.02 and adamw.param_groups[0]["weight_decay"] == 0.1
    owned = [p for o in (adamw, muon) for g in o.param_groups for p in g["params"]]
    assert len(owned) == len(set(map(id, owned))) == len(list(m.parameters()))
    t = build(tiny(n_embd=64, tie_embeddings=True), randomize=False)
    adamw, _ = t.setup_optimizers()
    assert len(adamw.param_groups) == 1 and adamw.param_groups[0]["params"][0] is t.transformer.wte.weight


def _compile_check(backend, dtype):
    m = build(tiny(n_layer=1, n_kv_head=2))
    idx = torch.randint(0, 101, (2, 16))
    tgt = torch.randint(0, 101, (2, 16))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        eager = m(idx, tgt)
        eager.backward()
        g_eager = m.transformer.wte.weight.grad.clone()
        m.zero_grad()
        compiled = torch.compile(m, backend=backend, fullgraph=True, dynamic=False)  # fullgraph: no graph breaks
        loss = compiled(idx, tgt)
        loss.backward()
        with torch.no_grad():
            logits = compiled.eval()(idx)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss, eager, **tol)
    torch.testing.assert_close(m.transformer.wte.weight.grad, g_eager, **tol)
    assert logits.shape == (2, 16, 101) and logits.dtype == torch.float32


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_attention_matches_sdpa(monkeypatch, n_kv_head, dtype):
    """Compiled CPU training takes the flash forward + recomputing matmul backward (GQA through grouped
    rows): same output and q/k/v gradients as SDPA; over the score budget, or eager, it is SDPA itself."""
    import nanochat.kernels as kernels
    torch.manual_seed(0)
    q = torch.randn(2, 4, 48, 32, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, n_kv_head, 48, 32, dtype=dtype, requires_grad=True) for _ in range(2))
    grad_out = torch.randn_like(q)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_kv_head != 4)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []
    def record(gm, example_inputs):  # AOT autograd's forward and backward graphs, run as they are
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)  # bf16: a few ulps
    for limit, ours_taken in ((kernels.RECOMPUTE_ATTENTION_MAX_SCORES, True), (0, False)):
        monkeypatch.setattr(kernels, "RECOMPUTE_ATTENTION_MAX_SCORES", limit)
        torch._dynamo.reset()
        graphs.clear()
        backend = aot_autograd(fw_compiler=record, bw_compiler=record)
        out = torch.compile(kernels.causal_attention, backend=backend, fullgraph=True)(q, k, v)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        assert len(graphs) == 2 and ("flash_attention_for_cpu_backward" not in graphs[1]) == ours_taken
        torch.testing.assert_close(out, ref, **tol)
        for ours, theirs in zip(grads, ref_grads):
            torch.testing.assert_close(ours, theirs, **tol)
    monkeypatch.undo()
    eager = kernels.causal_attention(q, k, v)  # eager: SDPA and the flash kernel's own backward
    assert "FlashAttention" in type(eager.grad_fn).__name__, type(eager.grad_fn).__name__


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_sdpa(n_kv_head, dtype):
    """A decode step's attention (one query per row), compiled on CPU: batched matmuls with the scores in fp32,
    even under bf16 autocast (no SDPA call in the graph), for each mask a decode step passes (rows' lengths,
    a window without rows, none) and GQA; the same output as SDPA. Eager, or with a mask per head, it is SDPA."""
    import nanochat.kernels as kernels
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func
    torch.manual_seed(0)
    B, Tk = 5, 37
    q = torch.randn(B, 4, 1, 32, dtype=dtype)
    k, v = (torch.randn(B, n_kv_head, Tk, 32, dtype=dtype) for _ in range(2))
    lengths = torch.tensor([1, 37, 20, 5, 30])
    per_head = torch.rand(B, 4, 1, Tk, generator=torch.Generator().manual_seed(1)) > 0.3
    per_head[..., 0] = True
    # a mask per head is left to SDPA (also compiled with symbolic sizes: no graph break)
    masks = [(torch.arange(Tk) < lengths[:, None])[:, None, None, :], torch.arange(Tk)[None, :] > 10, None, per_head]
    graphs = []
    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for mask in masks:
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                             enable_gqa=n_kv_head != 4).to(dtype)
        torch._dynamo.reset()
        graphs.clear()
        compiled = torch.compile(kernels.decode_attention, backend=aot_autograd(fw_compiler=record), fullgraph=True,
                                 dynamic=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = compiled(q, k, v, mask, n_kv_head != 4)
        assert len(graphs) == 1 and ("scaled_dot_product" in graphs[0]) == (mask is per_head)
        # bf16 inputs: converted to fp32 for the scores
        assert dtype == torch.float32 or mask is per_head or "torch.float32" in graphs[0]
        assert out.shape == q.shape and out.dtype == dtype
        torch.testing.assert_close(out, ref, **tol)
        torch.testing.assert_close(kernels.decode_attention(q, k, v, mask, n_kv_head != 4), ref, **tol)  # eager: SDPA


def test_torch_compile_traces_whole_model():
    """Dynamo + AOT autograd without codegen (seconds): the model compiles as one graph, fwd + bwd."""
    _compile_check("aot_eager", torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_inductor_cpu(dtype):
    """The real inductor path on CPU (~30 s per dtype on 2 cores, hence slow)."""
    _compile_check("inductor", dtype)


# -----------------------------------------------------------------------------
# CUDA (skipped where there is none): the same guarantees on the GPU paths (flash/efficient SDPA
# kernels, bf16 autocast, inductor's Triton backend)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cuda_kv_cache_matches_full_forward(n_kv_head, dtype):
    cfg = tiny(n_kv_head=n_kv_head, n_embd=128, sequence_len=64)
    m = build(cfg, device="cuda").eval()
    idx = torch.randint(0, 101, (2, 40), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        full = m(idx)
        cache = KVCache(2, n_kv_head, 8, cfg.head_dim, cfg.n_layer, dtype=dtype, device="cuda")
        outs = [m(idx[:, :10], kv_cache=cache), m(idx[:, 10:25], kv_cache=cache)]
        outs += [m(idx[:, t:t + 1], kv_cache=cache) for t in range(25, 40)]
    err = (torch.cat(outs, 1) - full).abs().max().item()
    assert err < (1e-4 if dtype == torch.float32 else 0.1 * full.abs().max().item())


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compile_matches_eager(dtype):
    m = build(tiny(n_kv_head=2, n_embd=128), device="cuda")
    idx = torch.randint(0, 101, (4, 32), device="cuda")
    tgt = torch.randint(0, 101, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        eager = m(idx, tgt)
        eager.backward()
        g_eager = m.transformer.wte.weight.grad.clone()
        m.zero_grad()
        loss = torch.compile(m, fullgraph=True, dynamic=False)(idx, tgt)
        loss.backward()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - eager.item()) < tol
    g = m.transformer.wte.weight.grad
    assert ((g - g_eager).norm() / g_eager.norm()).item() < (1e-3 if dtype == torch.float32 else 5e-2)
