"""Optimizers: Newton-Schulz orthogonalization, Muon and AdamW math, distributed == single process."""
import os
import subprocess
import sys

import pytest
import torch

from workers import dist_optim_worker as worker
from nanochat.optim import AdamW, Muon, orthogonalize

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
        opts = worker.train(model, worker.make_batch(config))
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distributed_optimizers_nccl_world1(tmp_path):
    """The NCCL calls (reduce-scatter, in-place all-gather, reduce, broadcast) at world size 1, where the
    result must equal the single-process optimizers exactly: runs in a subprocess so the process group
    does not leak into other tests."""
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
single = [AdamW(a, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1), Muon(m)]
distributed = [DistAdamW(b, lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1), DistMuon(n)]
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
