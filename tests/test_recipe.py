"""The 2026 recipe's parts (nanochat/recipe.py): residual scalars, value embeddings and sliding windows in the
model (each path: training, cached prefill/decode, rows at their own lengths), their parameter and FLOP counts,
their optimizer groups, the schedules, and the flags that switch them."""
import math

import pytest
import torch

from nanochat.batching import RowKVCache
from nanochat.engine import KVCache
from nanochat.gpt import GPT, GPTConfig
from nanochat.training import lr_multiplier, set_learning_rates, wd_multiplier
from tests.test_gpt import build, meta_params, tiny

ALL_PARTS = dict(residual_scalars=True, value_embeds=True, window_pattern="SL")


def test_layer_windows_and_value_embed_layers():
    c = tiny(n_layer=5, sequence_len=32, window_pattern="SSL", value_embeds=True)
    assert c.layer_windows() == [16, 16, None, 16, None]  # tiled S S L S, last forced L
    assert [c.has_value_embed(i) for i in range(5)] == [True, False, True, False, True]
    assert tiny(n_layer=4, value_embeds=True).has_value_embed(3) and not tiny(n_layer=4).has_value_embed(3)
    assert tiny(window_pattern="S", n_layer=1).layer_windows() == [None]  # a 1-layer model is its last layer
    for bad in ("", "SX", "s" * 65, 3):
        with pytest.raises(ValueError, match="window_pattern"):
            tiny(window_pattern=bad).validate()
    with pytest.raises(ValueError, match="value_embeds"):
        tiny(value_embeds=1).validate()


def test_param_groups_and_flops_count_the_parts():
    base = meta_params(tiny(n_layer=3, n_kv_head=2))
    g = meta_params(tiny(n_layer=3, n_kv_head=2, **ALL_PARTS))
    kv_dim = 2 * 8  # n_kv_head x head_dim (32 / 4)
    assert g["value_embeds"] == 2 * 101 * kv_dim  # layers 0 and 2
    assert g["attention"] - base["attention"] == 2 * 32 * 2  # a gate per VE layer: min(32, n_embd) x n_kv_head
    assert g["scalars"] == 2 * 3 and g["total"] == base["total"] + g["value_embeds"] + 2 * 32 * 2 + 6
    assert g["scaling"] == g["attention"] + g["mlp"] + 101 * 32  # tables and scalars scale no compute
    with torch.device("meta"):
        ref, win = GPT(tiny(n_layer=3)), GPT(tiny(n_layer=3, window_pattern="S"))
    # the two S layers attend to 16 positions instead of 32
    assert ref.estimate_flops() - win.estimate_flops() == 12 * 4 * 8 * (2 * 16)


def test_residual_scalars_at_init_are_the_reference_network():
    ref = build(tiny(n_layer=3), randomize=True)
    rs = build(tiny(n_layer=3, residual_scalars=True), randomize=False)
    rs.load_state_dict(ref.state_dict(), strict=False)
    assert rs.resid_lambdas.tolist() == [1.0] * 3 and rs.x0_lambdas.tolist() == [0.0] * 3
    idx = torch.randint(0, 101, (2, 16))
    torch.testing.assert_close(rs(idx), ref(idx))
    with torch.no_grad():
        rs.x0_lambdas.fill_(0.5)
    assert not torch.allclose(rs(idx), ref(idx))


def test_window_mask_is_the_band():
    for T0, T, window in ((0, 7, 3), (5, 1, 3), (4, 3, 2)):
        qpos = torch.arange(T0, T0 + T)[None]
        mask = GPT._window_mask(window, qpos, T0 + T)
        want = torch.tensor([[0 <= q - k < window for k in range(T0 + T)] for q in range(T0, T0 + T)])
        assert torch.equal(mask[0, 0], want)
    assert GPT._window_mask(8, torch.arange(6)[None], 6) is None  # reaches past position 0: no mask needed


def test_window_limits_what_a_layer_sees():
    """One S layer (window 4 of 16) in a model whose last layer is L: a token 4 or more positions back must not
    reach the S layer's output, so with the L layer removed from the picture (a 1-layer "S" model is forced L, so
    look at the first block's output directly) changing it leaves the later positions' block output unchanged."""
    m = build(tiny(n_layer=2, sequence_len=8, window_pattern="S"), randomize=True)
    assert m.config.layer_windows() == [4, None]
    seen = []
    m.transformer.h[0].register_forward_hook(lambda mod, inp, out: seen.append(out))
    idx = torch.randint(0, 101, (1, 8))
    m(idx)
    idx2 = idx.clone()
    idx2[0, 1] = (idx[0, 1] + 1) % 101
    m(idx2)
    a, b = seen
    torch.testing.assert_close(a[:, 5:], b[:, 5:])  # positions 5.. are >= 4 back from 1: unaffected
    assert not torch.allclose(a[:, 1:5], b[:, 1:5])  # positions 1..4 see it


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_decode_matches_full_forward_with_every_part(n_kv_head):
    m = build(tiny(n_layer=3, n_kv_head=n_kv_head, sequence_len=16, **ALL_PARTS), randomize=True)
    idx = torch.randint(0, 101, (2, 24))  # longer than the window (8) and the training length
    full = m(idx)
    cache = KVCache(2, n_kv_head, 8, m.config.head_dim, m.config.n_layer)
    pieces = [m(idx[:, :6], kv_cache=cache), m(idx[:, 6:13], kv_cache=cache)]
    pieces += [m(idx[:, t:t + 1], kv_cache=cache) for t in range(13, 24)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rows_at_their_own_lengths_match_alone():
    """The continuous-batching cache with every part on: prompts of different lengths prefilled together
    (right-padded, logits at each row's last token), then one batched decode step with the rows at different
    positions; each row's logits equal to running it alone."""
    m = build(tiny(n_layer=3, n_kv_head=2, sequence_len=16, **ALL_PARTS), randomize=True)
    seqs = [torch.randint(0, 101, (n,)) for n in (13, 5, 9)]
    cache = RowKVCache(2, m.config.head_dim, m.config.n_layer, torch.float32, "cpu")
    cache.reserve(3, 32)
    prompts = [s[:-1] for s in seqs]
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(3, max(lengths), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = p
    cache.begin(3, max(lengths), valid=lengths)
    with torch.no_grad():  # as the scheduler runs it
        first = m(ids, kv_cache=cache, last_only=torch.tensor(lengths) - 1)
        assert cache.lengths == lengths
        for row, p in enumerate(prompts):
            torch.testing.assert_close(first[row, -1], m(p[None])[0, -1], atol=1e-5, rtol=1e-5)
        cache.begin(3, 1)
        batched = m(torch.stack([s[-1:] for s in seqs]), kv_cache=cache)
        for row, s in enumerate(seqs):
            torch.testing.assert_close(batched[row, -1], m(s[None])[0, -1], atol=1e-5, rtol=1e-5)


def test_every_part_trains_and_gets_gradients():
    torch.manual_seed(0)
    m = build(tiny(n_layer=3, n_kv_head=2, **ALL_PARTS), randomize=False)
    opts = m.setup_optimizers(embedding_lr=0.2, matrix_lr=0.02)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 101, (4, 32), generator=g), torch.randint(0, 101, (4, 32), generator=g)
    losses = []
    for _ in range(25):
        loss = m(x, y)
        loss.backward()
        if len(losses) == 5:  # (at step 0 the zero-initialized head passes no gradient back)
            for name, p in m.named_parameters():
                if name.endswith("ve_gate.weight") or "value_embeds" in name or "lambdas" in name:
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        for o in opts:
            o.step()
        m.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(101), abs=1.0) and losses[-1] < 0.6 * losses[0], losses


def test_optimizer_groups_of_the_parts():
    m = build(tiny(n_embd=64, n_layer=2, **ALL_PARTS), randomize=False)
    adamw, muon = m.setup_optimizers(embedding_lr=0.2, weight_decay=0.1, scalar_lr=0.5)
    scale = (64 / 768) ** -0.5
    by_param = {id(p): g for g in adamw.param_groups for p in g["params"]}
    ve = next(iter(m.value_embeds.values())).weight
    assert by_param[id(ve)]["lr"] == pytest.approx(0.2 * scale) and by_param[id(ve)]["weight_decay"] == 0.1
    assert by_param[id(m.x0_lambdas)]["lr"] == 0.5 and by_param[id(m.resid_lambdas)]["lr"] == 0.005
    assert by_param[id(m.x0_lambdas)]["weight_decay"] == by_param[id(m.resid_lambdas)]["weight_decay"] == 0.0
    gates = {id(b.attn.ve_gate.weight) for b in m.transformer.h if b.attn.ve_gate is not None}
    assert gates <= {id(p) for g in muon.param_groups for p in g["params"]}
    owned = [p for o in (adamw, muon) for g in o.param_groups for p in g["params"]]
    assert len(owned) == len(set(map(id, owned))) == len(list(m.parameters()))


def test_schedules():
    assert [lr_multiplier(s, 100, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier(0, 100, warmup_ratio=0.5, warmup_steps=2) == 0.5  # steps win over the ratio
    assert lr_multiplier(100, 100, warmdown_ratio=0.65, final_lr_frac=0.05) == pytest.approx(0.05)
    assert lr_multiplier(35, 100, warmdown_ratio=0.65, final_lr_frac=0.05) == 1.0
    assert lr_multiplier(36, 100, warmdown_ratio=0.65, final_lr_frac=0.05) < 1.0
    assert [wd_multiplier(s, 4, "linear") for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert wd_multiplier(3, 4) == 1.0
    m = build(tiny(), randomize=False)
    opts = m.setup_optimizers(weight_decay=0.2)
    set_learning_rates(opts, 0.5, wdm=0.25)
    assert all(g["weight_decay"] == g["initial_weight_decay"] * 0.25 and g["lr"] == g["initial_lr"] * 0.5
               for o in opts for g in o.param_groups)


def test_auto_batch_and_horizon():
    import argparse
    from nanochat.recipe import auto_batch_size, reference_tokens, training_horizon
    assert auto_batch_size(1e9, 1e9) == 2 ** 19
    assert auto_batch_size(1e10, 1e9) == 2 ** 20  # 10^0.383 = 2.42x -> rounds to one doubling
    assert auto_batch_size(1e8, 1e9) == 2 ** 18 and auto_batch_size(1e11, 1e9) == 2 ** 22  # 100^0.383: 2^2.54
    from nanochat.recipe import model_flags
    args = argparse.Namespace(**vars(model_flags(depth=4, head_dim=64)), target_param_data_ratio=10.5,
                              total_batch_size=-1, num_iterations=-1, target_flops=-1.0)
    with torch.device("meta"):
        d12 = GPT(GPTConfig(vocab_size=1000, n_layer=12, n_head=12, n_kv_head=12, n_embd=768,
                            value_embeds=True)).num_params_by_group()  # the flags' default: the gates are matmuls
    assert reference_tokens(args, 1000) == 10.5 * d12["scaling"]
    batch, steps = training_horizon(args, 5e6, 3e7, 1000)
    assert batch == auto_batch_size(10.5 * 5e6, 10.5 * d12["scaling"]) and steps == round(10.5 * 5e6 / batch)
    args.target_flops = 3e14  # 1e7 tokens at 3e7 FLOPs per token
    assert training_horizon(args, 5e6, 3e7, 1000)[1] == round(1e7 / training_horizon(args, 5e6, 3e7, 1000)[0])
    args.total_batch_size, args.num_iterations = 4096, 7
    assert training_horizon(args, 5e6, 3e7, 1000) == (4096, 7)
    args.total_batch_size = -1
    with pytest.raises(ValueError, match="--total-batch-size=-1 .* --num-iterations"):
        training_horizon(args, 5e6, 3e7, 1000)


def test_every_part_compiles_without_graph_breaks():
    m = build(tiny(n_layer=3, n_kv_head=2, sequence_len=16, **ALL_PARTS), randomize=True)
    idx, tgt = torch.randint(0, 101, (2, 16)), torch.randint(0, 101, (2, 16))
    eager = m(idx, tgt)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True, dynamic=False)  # fullgraph: no graph breaks
    torch.testing.assert_close(compiled(idx, tgt), eager)
