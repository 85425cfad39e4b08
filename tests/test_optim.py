"""Optimizers: Newton-Schulz / Polar Express orthogonalization, Muon (and its NorMuon / weight decay
variants) and AdamW math, distributed == single process."""
import os
import subprocess
import sys

import pytest
import torch

from workers import dist_optim_worker as worker
from nanochat.optim import (NS_COEFFS, POLAR_EXPRESS_COEFFS, POLAR_EXPRESS_SAFETY, AdamW, Muon, normuon_scale,
                            orthogonalize)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 160), (256, 1024)])
def test_orthogonalized_update_has_singular_values_near_one(shape):
    """5 quintic Newton-Schulz steps map every singular value that is not negligible (here a condition
    number of 100: down to ~4e-3 of the Frobenius norm) into a band around 1, keeping the singular vectors."""
    torch.manual_seed(0)
    k = min(shape)
    U, _ = torch.linalg.qr(torch.randn(shape[0], k))
    V, _ = torch.linalg.qr(torch.randn(shape[1], k))
    sigma = torch.logspace(-2, 0, k)[torch.randperm(k)]
    G = 7.0 * U @ torch.diag(sigma) @ V.T
    X = orthogonalize(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.6 and s.max() < 1.25, (s.min(), s.max())
    assert abs(s.mean().item() - 1.0) < 0.15
    core = U.T @ X.float() @ V  # ~diagonal when the singular vectors are kept
    off = core - torch.diag(torch.diagonal(core))
    assert off.abs().max() < 0.05 and torch.diagonal(core).min() > 0.6


def test_muon_step_scale_and_nesterov():
    torch.manual_seed(0)
    for shape in [(96, 32), (32, 96)]:
        p = torch.nn.Parameter(torch.zeros(*shape))
        p.grad = torch.randn(*shape)
        opt = Muon([p], lr=0.1, momentum=0.9, nesterov=True)
        opt.step()
        # first step: buf = 0.1 g, nesterov update = 0.1 g + 0.9 * buf = 0.19 g
        expected = -0.1 * max(1, shape[0] / shape[1]) ** 0.5 * orthogonalize(0.19 * p.grad).float()
        torch.testing.assert_close(p.data, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.1 * p.grad)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def apply_quintics(x, coeffs):
    for a, b, c in coeffs:
        x = a * x + b * x ** 3 + c * x ** 5
    return x


def test_polar_express_scalar_polynomials():
    """The 5 Polar Express quintics, in fp64 on every singular value the normalization can produce
    ([1e-3, 1] of the Frobenius norm, divided by the safety factor), end within 0.16 of 1 (measured:
    [0.847, 1.141]); 5 Newton-Schulz steps leave [0.47, 1.20]. The safety factor is needed: a value
    that rounding pushed 10% above the range blows up (they hold up to ~1.0218 unscaled)."""
    x = torch.logspace(-3, 0, 100_001, dtype=torch.float64) / POLAR_EXPRESS_SAFETY
    pe = apply_quintics(x, POLAR_EXPRESS_COEFFS)
    ns = apply_quintics(x, [NS_COEFFS] * 5)
    assert (pe - 1).abs().max() < 0.16, ((pe - 1).abs().max())
    assert (ns - 1).abs().max() > 0.5  # what Polar Express improves on
    assert apply_quintics(torch.tensor(1.1, dtype=torch.float64), POLAR_EXPRESS_COEFFS) > 10


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (3, 64, 256), (3, 256, 64)])
def test_polar_express_closer_to_orthogonal_than_newton_schulz(shape):
    """Random Gaussian matrices (singly and stacked): max |s - 1| over the singular values after 5 steps
    is ~0.14 with Polar Express vs ~0.32 with Newton-Schulz (measured), in bf16 as used."""
    torch.manual_seed(0)
    G = torch.randn(*shape)
    worst = {}
    for method in ("newton-schulz", "polar-express"):
        X = orthogonalize(G, steps=5, method=method)
        assert X.shape == G.shape and X.dtype == torch.bfloat16
        worst[method] = (torch.linalg.svdvals(X.float()) - 1).abs().max().item()
    assert worst["polar-express"] < 0.17 and worst["polar-express"] < 0.6 * worst["newton-schulz"], worst


def test_polar_express_keeps_singular_vectors_and_limits_steps():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(96, 32))
    V, _ = torch.linalg.qr(torch.randn(32, 32))
    sigma = torch.logspace(-2, 0, 32)
    X = orthogonalize(5.0 * U @ torch.diag(sigma) @ V.T, steps=5, method="polar-express").float()
    core = U.T @ X @ V
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 0.05
    assert torch.diagonal(core).min() > 0.8 and torch.diagonal(core).max() < 1.2
    # one nonzero entry: its singular value is the Frobenius norm, the top of the range (where the
    # polynomials oscillate fastest, so bf16 rounding decides where in the band it lands)
    G = torch.zeros(64, 256)
    G[3, 5] = 4.0
    X = orthogonalize(G, steps=5, method="polar-express").float()
    assert 0.84 < X[3, 5].item() < 1.15 and X.count_nonzero() == 1
    with pytest.raises(ValueError, match="ns_steps=6"):
        orthogonalize(torch.randn(8, 8), steps=6, method="polar-express")
    with pytest.raises(ValueError, match="ns_steps=6"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ortho="polar-express", ns_steps=6)
    with pytest.raises(ValueError, match="ortho must be one of"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], ortho="svd")
    with pytest.raises(ValueError, match="normuon_beta2"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4))], normuon_beta2=1.0)


def twin_muons(shape, seed=0, scale=1.0, **options):
    """Two copies of one random parameter, a plain Muon on the first and Muon(**options) on the second."""
    torch.manual_seed(seed)
    a = torch.nn.Parameter(scale * torch.randn(*shape))
    b = torch.nn.Parameter(a.detach().clone())
    return a, b, Muon([a], lr=0.1, momentum=0.9), Muon([b], lr=0.1, momentum=0.9, **options)


def step_both(a, b, opt_a, opt_b):
    """One step of both on the same gradient; returns (plain update, variant update)."""
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad = torch.randn_like(a)
    b.grad = a.grad.clone()
    opt_a.step()
    opt_b.step()
    return a.detach() - a0, b.detach() - b0


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
def test_normuon_state_norm_and_equalized_first_step(shape):
    """One second moment per row when rows >= cols, else per column (a semi-orthogonal matrix's
    rows are unit vectors when it is wide and its columns when it is tall, so only the other
    direction's norms vary). The update keeps plain Muon's Frobenius norm at every step, and the first
    step (v = (1 - beta2) * mean O^2, no history yet) gives every neuron the same norm."""
    a, b, opt_a, opt_b = twin_muons(shape, normuon_beta2=0.95)
    neuron_dim = 0 if shape[0] >= shape[1] else 1
    for step in range(3):
        plain, normuon = step_both(a, b, opt_a, opt_b)
        v = opt_b.state[b]["second_moment"]
        assert v.shape == ((shape[0], 1) if neuron_dim == 0 else (1, shape[1])) and v.dtype == torch.float32
        assert "second_moment" not in opt_a.state[a]
        torch.testing.assert_close(normuon.norm(), plain.norm(), rtol=1e-5, atol=0)
        norms = normuon.norm(dim=1 - neuron_dim)
        if step == 0:
            assert norms.std() / norms.mean() < 1e-3
            plain_norms = plain.norm(dim=1 - neuron_dim)
            assert plain_norms.std() / plain_norms.mean() > 0.02 or shape[0] == shape[1]
        else:
            assert not torch.equal(normuon, plain)


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)])
def test_normuon_scales_down_neurons_with_large_second_moment(shape):
    """Given the same orthogonalized update O, the neurons whose running second moment is 100x the
    others' come out smaller relative to O than the rest; each neuron's scale is proportional to
    1 / sqrt(v) after the EMA update, and the total norm stays O's. No bias correction needed: from an
    empty state, step 1's v = (1 - beta2) m is the bias-corrected m times a constant, and gives the
    same result as beta2 = 0 (v = m)."""
    torch.manual_seed(0)
    O = orthogonalize(torch.randn(2, *shape))
    neuron_dim, other = (-2, -1) if shape[0] >= shape[1] else (-1, -2)
    n = shape[neuron_dim]
    base = 0.1 * (torch.rand(n) + 0.5)  # mean O^2 is ~1/64 per neuron here: the history dominates
    base[: n // 4] *= 100.0
    v0 = base.view(-1, 1) if neuron_dim == -2 else base.view(1, -1)
    states = [dict(second_moment=v0.clone()) for _ in range(2)]
    out = O.float() * normuon_scale(O, states, beta2=0.9)
    ratio = out.norm(dim=other) / O.float().norm(dim=other)  # (2, n): each neuron's scale
    assert ratio[:, : n // 4].max() < 0.4 * ratio[:, n // 4:].min()
    v_new = torch.stack([st["second_moment"].flatten() for st in states])
    torch.testing.assert_close(v_new, 0.9 * base + 0.1 * O.float().square().mean(dim=other))
    product = ratio * v_new.sqrt()
    assert (product.std(dim=1) / product.mean(dim=1)).max() < 1e-3
    torch.testing.assert_close(out.norm(dim=(-2, -1)), O.float().norm(dim=(-2, -1)))
    first = [O.float() * normuon_scale(O, [{}, {}], beta2=beta2) for beta2 in (0.95, 0.0)]
    torch.testing.assert_close(first[0], first[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cautious", [False, True])
def test_weight_decay_exact(cautious):
    """Muon(weight_decay=w) vs plain Muon on the same parameters and gradients: the difference is
    exactly -lr * w * p (p before the step), and with cautious_wd only where u * p > 0 for the update
    u = -(plain step) / lr. Step 2 uses a new lr and w set on the group, as a schedule does."""
    a, b, opt_a, opt_b = twin_muons((48, 32), scale=0.05, weight_decay=0.5, cautious_wd=cautious)
    masks = []
    for lr, wd in [(0.1, 0.5), (0.03, 2.0)]:
        for opt in (opt_a, opt_b):
            opt.param_groups[0]["lr"] = lr
        opt_b.param_groups[0]["weight_decay"] = wd
        p_before = b.detach().clone()
        plain, variant = step_both(a, b, opt_a, opt_b)
        mask = (-plain * p_before > 0) if cautious else torch.ones_like(p_before, dtype=torch.bool)
        torch.testing.assert_close(b.detach(), p_before - lr * wd * mask * p_before + plain, rtol=0, atol=1e-7)
        masks.append(mask.float().mean().item())
    if cautious:
        assert all(0.3 < m < 0.7 for m in masks), masks  # the mask does select, roughly half the entries


def test_muon_loads_state_dict_without_variant_keys():
    """A checkpoint from before the variants existed resumes as plain Muon."""
    p = torch.nn.Parameter(torch.randn(8, 4))
    p.grad = torch.randn(8, 4)
    opt = Muon([p])
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for key in ("ortho", "normuon_beta2", "weight_decay", "cautious_wd"):
            del group[key]
    fresh = Muon([p])
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["ortho"] == "newton-schulz" and fresh.param_groups[0]["weight_decay"] == 0.0
    fresh.step()


def test_adamw_matches_torch():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 5))
    b = torch.nn.Parameter(a.detach().clone())
    ours = AdamW([a], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(8, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # a checkpoint from before the fused step kept "step" as an int: it resumes where it stopped
    saved = ours.state_dict()
    assert saved["state"][0]["step"].dtype == torch.float32 and saved["state"][0]["step"].item() == 5
    saved["state"][0]["step"] = 5
    resumed = AdamW([a], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    resumed.load_state_dict(saved)
    for _ in range(3):
        g = torch.randn(8, 5)
        a.grad, b.grad = g.clone(), g.clone()
        resumed.step()
        ref.step()
    assert resumed.state[a]["step"].item() == 8
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_distributed_optimizers_match_single_process(tmp_path):
    """2 gloo ranks, each with half of the global batch, vs one process with all of it, after
    worker.STEPS steps. Gradients differ only in fp32 summation order (~1e-7 relative), but Muon's
    Newton-Schulz steps in bf16 and Adam's per-element normalization amplify that, so parameters are
    compared by how far each tensor moved: ||dist - single|| <= 5% of ||single - init|| (measured: at
    most ~2%, in the zero-initialized projections). A stale parameter on a rank that does not own it, or
    a wrong shard, is off by ~100% of that distance. Muon and AdamW are nearly invariant to the
    gradient's scale, so a missing average would hide in the parameters: the optimizer state (AdamW
    moments, Muon momentum: linear in the gradient) is compared on the shard or matrices each rank owns,
    to 1% relative error in norm (a missing average is 50% off), and must be absent on the ranks that
    do not own it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "tests", "workers", "dist_optim_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, config in worker.CASES.items():
        model = worker.make_model(config)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        options = worker.MUON_OPTIONS.get(name, {})
        opts = worker.train(model, worker.make_batch(config), muon_options=options)
        single = model.state_dict()
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2)]
        for r in range(2):
            assert ranks[r]["params"].keys() == single.keys()
            for k, v in single.items():
                moved = (v - init[k]).norm()
                assert moved > 0 and (ranks[r]["params"][k] - v).norm() <= 0.05 * moved, (name, r, k)
        # AdamW: row shards (even vocab) or one owner (odd vocab); Muon: matrix i belongs to rank i % 2
        adam_params = [p for g in opts[0].param_groups for p in g["params"]]
        for i, p in enumerate(adam_params):
            full = opts[0].state[p]
            if p.size(0) % 2 == 0:
                rows = p.size(0) // 2
                for r in range(2):
                    st = ranks[r]["states"][0][i]
                    assert st["step"] == worker.STEPS
                    for key in ("exp_avg", "exp_avg_sq"):
                        assert rel_err(st[key], full[key][r * rows:(r + 1) * rows]) < 1e-2
            else:
                owner = i % 2
                assert i not in ranks[1 - owner]["states"][0]
                assert rel_err(ranks[owner]["states"][0][i]["exp_avg"], full["exp_avg"]) < 1e-2
        muon_params = [p for g in opts[1].param_groups for p in g["params"]]
        for i, p in enumerate(muon_params):
            owner = i % 2
            assert i not in ranks[1 - owner]["states"][1]
            assert rel_err(ranks[owner]["states"][1][i]["momentum_buffer"], opts[1].state[p]["momentum_buffer"]) < 1e-2
            # NorMuon's second moment (of the orthogonalized update: blind to a missing average, but it
            # must be kept by the owner alone and track the single-process one)
            assert ranks[owner]["states"][1][i].keys() == opts[1].state[p].keys()
            if "second_moment" in opts[1].state[p]:
                assert rel_err(ranks[owner]["states"][1][i]["second_moment"], opts[1].state[p]["second_moment"]) < 3e-2
        for r in range(2):  # the variants really ran on every rank
            assert all(g.items() >= options.items() for g in ranks[r]["muon_settings"]), (name, r)
        assert ("second_moment" in opts[1].state[muon_params[0]]) == bool(options.get("normuon_beta2"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distributed_optimizers_nccl_world1(tmp_path):
    """The NCCL calls (reduce-scatter, in-place all-gather, reduce, broadcast) at world size 1, where the
    result must equal the single-process optimizers exactly (plain Muon and all its variants): runs in a
    subprocess so the process group does not leak into other tests."""
    code = f"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {REPO_ROOT!r})
from nanochat.optim import AdamW, DistAdamW, DistMuon, Muon
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
dist.init_process_group("nccl", rank=0, world_size=1)
torch.manual_seed(0)
dev = torch.device("cuda")
a = [torch.nn.Parameter(torch.randn(*s, device=dev)) for s in [(256, 64), (63, 64)]]
m = [torch.nn.Parameter(torch.randn(*s, device=dev) * 0.1) for s in [(128, 64), (64, 128), (64, 64), (64, 64)]]
b = [torch.nn.Parameter(p.detach().clone()) for p in a]
n = [torch.nn.Parameter(p.detach().clone()) for p in m]
m2 = [torch.nn.Parameter(torch.randn(*s, device=dev) * 0.1) for s in [(128, 64), (64, 128), (64, 64), (64, 64)]]
n2 = [torch.nn.Parameter(p.detach().clone()) for p in m2]
variants = dict(ortho="polar-express", normuon_beta2=0.95, weight_decay=0.1, cautious_wd=True)
single = [AdamW(a, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1), Muon(m), Muon(m2, **variants)]
distributed = [DistAdamW(b, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1), DistMuon(n),
               DistMuon(n2, **variants)]
m, n = m + m2, n + n2
for _ in range(3):
    for p, q in zip(a + m, b + n):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    for o in single + distributed:
        o.step()
err = max((p - q).abs().max().item() for p, q in zip(a + m, b + n))
dist.destroy_process_group()
assert err < 1e-6, err
print("OK", err)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
