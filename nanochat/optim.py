"""
Optimizers: AdamW (embedding, head) and Muon (the 2-D matrices inside the blocks), each in a
single-process and a distributed version.

The distributed versions replace DDP for the parameters they own: call loss.backward() on each rank's
local batch (no DDP wrapper, no gradient all-reduce), then step(); the optimizer averages gradients
across ranks as part of its own communication:
- DistAdamW shards the optimizer state: reduce-scatter the gradient along dim 0 (each rank receives the
  averaged gradient of its 1/world rows), update those rows with its own moment buffers, all-gather the
  parameter. A matrix whose dim 0 does not divide by world_size instead goes whole to one owner rank
  (reduce to it, it updates, broadcast).
- DistMuon gives each matrix to one owner rank, round-robin (matrix i of a param group to rank
  i % world): the gradient is reduced to the owner, which alone keeps its momentum and runs the
  Newton-Schulz orthogonalization (batched over its same-shape matrices), then broadcasts the values.
So optimizer state differs per rank: checkpoint it per rank.
Both use only reduce_scatter / all_gather (in place) / reduce / broadcast with SUM, which NCCL and gloo
both support (checked on torch 2.13), and divide by world_size (ReduceOp.AVG is NCCL-only for some
collectives). After step() the local .grad tensors hold partial sums: zero them as usual.
"""
import torch
import torch.distributed as dist

# reduce_scatter_tensor / all_gather_into_tensor are deprecated in newer torch in favour of *_single
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# -----------------------------------------------------------------------------
# AdamW

@torch.no_grad()
def adamw_update(p, grad, state, group):
    """One AdamW step on p (a parameter or a shard of one), decoupled weight decay, at its group's settings."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state["step"] += 1
    t, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** t))


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    adamw_update(p, p.grad, self.state[p], group)


class DistAdamW(AdamW):
    """AdamW with state sharded across ranks (ZeRO-1 style); see the module docstring."""

    @torch.no_grad()
    def step(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        jobs = []  # (group, p, grad_or_shard, work, owner): owner None means row-sharded
        params = [(group, p) for group in self.param_groups for p in group["params"]]
        for index, (group, p) in enumerate(params):
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if p.size(0) % world == 0:
                shard = torch.empty_like(grad[: p.size(0) // world])
                jobs.append((group, p, shard, _reduce_scatter(shard, grad, async_op=True), None))
            else:
                owner = index % world
                jobs.append((group, p, grad, dist.reduce(grad, dst=owner, async_op=True), owner))
        gathers = []
        for group, p, grad, work, owner in jobs:
            work.wait()
            if owner is None:
                rows = p.size(0) // world
                p_shard = p.data[rank * rows:(rank + 1) * rows]
                adamw_update(p_shard, grad.div_(world), self.state[p], group)
                gathers.append(_all_gather(p.data, p_shard, async_op=True))  # in place: p_shard is a view of p
            else:
                if owner == rank:
                    adamw_update(p.data, grad.div_(world), self.state[p], group)
                gathers.append(dist.broadcast(p.data, src=owner, async_op=True))
        for work in gathers:
            work.wait()


# -----------------------------------------------------------------------------
# Muon: momentum, then replace the update by the nearest semi-orthogonal matrix (all singular values
# ~1), computed approximately by a Newton-Schulz iteration, scaled up for tall matrices.

# Quintic Newton-Schulz coefficients (a, b, c) for X <- a X + b (X X^T) X + c (X X^T)^2 X. Chosen (Muon's
# published choice) to push singular values in (0, 1] quickly towards ~1 rather than to converge
# exactly: after 5 steps they land roughly in [0.7, 1.2], which works as well as exact orthogonalization.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(G, steps=5):
    """Approximate U V^T of G = U S V^T, in bf16 (fast on tensor cores / AMX, accurate enough).
    G is a matrix or a stack of same-shape matrices (batched: one bmm per product for all of them)."""
    assert G.ndim in (2, 3), "orthogonalize expects a matrix or a stack of matrices"
    a, b, c = NS_COEFFS
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation so X X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # Frobenius >= spectral norm: singular values in [0, 1]
    mm_add = torch.baddbmm if X.ndim == 3 else torch.addmm
    for _ in range(steps):
        A = X @ X.mT
        B = mm_add(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = mm_add(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


@torch.no_grad()
def muon_apply(params, grads, states, group):
    """Momentum, orthogonalization (batched over same-shape matrices: the blocks' q/k/v/proj and MLP
    matrices come in a few shapes) and the scaled step for these parameters."""
    by_shape, momentum = {}, group["momentum"]
    for p, g, st in zip(params, grads, states):
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(g)
        buf = st["momentum_buffer"]
        buf.lerp_(g, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
        by_shape.setdefault(tuple(p.shape), []).append((p, g.lerp(buf, momentum) if group["nesterov"] else buf))
    for (rows, cols), items in by_shape.items():
        ortho = orthogonalize(torch.stack([u for _, u in items]), group["ns_steps"])
        # an orthogonal update has RMS ~1/sqrt(max dim); tall matrices get sqrt(rows/cols) more
        alpha = -group["lr"] * max(1.0, rows / cols) ** 0.5
        for (p, _), o in zip(items, ortho):
            p.add_(o.to(p.dtype), alpha=alpha)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters only (the matrices inside the transformer blocks)."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2-D parameters, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            muon_apply([p.data for p in params], [p.grad for p in params], [self.state[p] for p in params], group)


class DistMuon(Muon):
    """Muon with each matrix's update computed by one owner rank (round-robin); see the module docstring."""

    @torch.no_grad()
    def step(self):
        rank, world = dist.get_rank(), dist.get_world_size()
        for group in self.param_groups:
            reduces = []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                reduces.append(dist.reduce(p.grad, dst=i % world, async_op=True))
            for work in reduces:
                work.wait()
            mine = [p for i, p in enumerate(group["params"]) if i % world == rank]
            muon_apply([p.data for p in mine], [p.grad.div_(world) for p in mine], [self.state[p] for p in mine], group)
            broadcasts = [dist.broadcast(p.data, src=i % world, async_op=True) for i, p in enumerate(group["params"])]
            for work in broadcasts:
                work.wait()
