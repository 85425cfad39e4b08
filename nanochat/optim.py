"""
Optimizers: AdamW (embedding, head) and Muon (the 2-D matrices inside the blocks), each in a
single-process and a distributed version.

Muon variants, each off by default (plain Muon) and switched by a constructor option / param-group key,
as upstream nanochat adopted them (Jan 2026):
- ortho="polar-express": Polar Express orthogonalization (Amsel et al. 2025, arXiv 2505.16932), a
  different minimax-optimal quintic per iteration instead of Newton-Schulz's fixed one: singular values
  end closer to 1 in the same 5 iterations.
- normuon_beta2 > 0: NorMuon (Li et al. 2025, arXiv 2510.05491), an EMA of each neuron's squared
  orthogonalized update that evens out the update size across neurons at a fixed total norm.
- weight_decay > 0: decoupled weight decay on the matrices (as AdamW's), and with cautious_wd=True only
  where the update already shrinks the weight (Cautious weight decay, Chen et al. 2025, arXiv 2510.12402).

The distributed versions replace DDP for the parameters they own: call loss.backward() on each rank's
local batch (no DDP wrapper, no gradient all-reduce), then step(); the optimizer averages gradients
across ranks as part of its own communication:
- DistAdamW shards the optimizer state: reduce-scatter the gradient along dim 0 (each rank receives the
  averaged gradient of its 1/world rows), update those rows with its own moment buffers, all-gather the
  parameter. A matrix whose dim 0 does not divide by world_size instead goes whole to one owner rank
  (reduce to it, it updates, broadcast).
- DistMuon gives each matrix to one owner rank, round-robin (matrix i of a param group to rank
  i % world): the gradient is reduced to the owner, which alone keeps all of that matrix's state and
  runs its whole update (muon_apply, shared with Muon: orthogonalization batched over its same-shape
  matrices, NorMuon, weight decay), then broadcasts the values.
So optimizer state differs per rank: checkpoint it per rank.
Both use only reduce_scatter / all_gather (in place) / reduce / broadcast with SUM, which NCCL and gloo
both support (checked on torch 2.13), and divide by world_size (ReduceOp.AVG is NCCL-only for some
collectives). After step() the local .grad tensors hold partial sums: zero them as usual.
"""
import torch
import torch.distributed as dist
from torch.optim.adamw import adamw as functional_adamw

# reduce_scatter_tensor / all_gather_into_tensor are deprecated in newer torch in favour of *_single
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# -----------------------------------------------------------------------------
# AdamW

FUSED_ADAMW_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel


@torch.no_grad()
def adamw_update(params, grads, states, group):
    """One AdamW step (decoupled weight decay: p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)) on these
    parameters (or shards of them) at their group's settings, through torch's functional AdamW: its fused
    kernel on CPU and CUDA makes one pass over each tensor where the textbook form makes eight (on the
    value-embedding tables, 4 x 8192 x 384, 3.3x faster than that form on CPU). State per tensor: "exp_avg",
    "exp_avg_sq" and "step" (a float32 0-d tensor on the parameter's device, as the fused kernel wants; a
    checkpoint from before kept an int, converted here)."""
    for p, st in zip(params, states):
        if not st:
            st.update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                      exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        elif not torch.is_tensor(st["step"]) or st["step"].device != p.device:
            st["step"] = torch.as_tensor(st["step"], dtype=torch.float32).to(p.device)
    (beta1, beta2), fused = group["betas"], all(p.device.type in FUSED_ADAMW_DEVICES for p in params)
    functional_adamw(params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                     [], [st["step"] for st in states], foreach=False, fused=fused, amsgrad=False, beta1=beta1,
                     beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


class AdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                adamw_update(params, [p.grad for p in params], [self.state[p] for p in params], group)


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
                p_shard = p.data.chunk(world)[rank]  # this rank's rows (dim 0 divides by world)
                adamw_update([p_shard], [grad.div_(world)], [self.state[p]], group)
                gathers.append(_all_gather(p.data, p_shard, async_op=True))  # in place: p_shard is a view of p
            else:
                if owner == rank:
                    adamw_update([p.data], [grad.div_(world)], [self.state[p]], group)
                gathers.append(dist.broadcast(p.data, src=owner, async_op=True))
        for work in gathers:
            work.wait()


# -----------------------------------------------------------------------------
# Muon: momentum, then replace the update by the nearest semi-orthogonal matrix (all singular values
# ~1), computed approximately by an odd matrix polynomial iteration, scaled up for tall matrices.

# Quintic Newton-Schulz coefficients (a, b, c) for X <- a X + b (X X^T) X + c (X X^T)^2 X. Chosen (Muon's
# published choice) to push singular values in (0, 1] quickly towards ~1 rather than to converge
# exactly: after 5 steps they land roughly in [0.7, 1.2], which works as well as exact orthogonalization.
NS_COEFFS = (3.4445, -4.7750, 2.0315)

# Polar Express (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932): one minimax-optimal odd quintic
# per iteration, each optimal for the interval the previous ones leave, computed with the paper's method
# for 5 iterations on singular values in [1e-3, 1], safety factor 2e-2 and cushion 2 (the values
# modded-nanogpt and upstream nanochat use). The input is divided by 1.02 * its Frobenius norm, so bf16
# rounding cannot push a singular value past the range the polynomials were made for: in fp64 they keep
# x in [1e-3, 1.0218] within 0.16 of 1 and send x = 1.1 to infinity. Checked in fp64 on scalars in
# [1e-3, 1] / 1.02: all land in [0.847, 1.141] (5 Newton-Schulz steps: [0.47, 1.20]); tests/test_optim.py.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02
ORTHO_METHODS = ("newton-schulz", "polar-express")


def _ortho_coeffs(method, steps):
    """(per-iteration coefficients, normalization safety factor) for `method`, or a ValueError."""
    if method == "newton-schulz":
        return (NS_COEFFS,) * steps, 1.0
    if method == "polar-express":
        if steps > len(POLAR_EXPRESS_COEFFS):
            raise ValueError(f"ortho='polar-express' has coefficients for at most {len(POLAR_EXPRESS_COEFFS)} "
                             f"iterations, got ns_steps={steps}: each polynomial is optimal for the interval its "
                             "predecessors leave, so there is no further one to repeat; use ns_steps <= 5 (5 is "
                             "already closer to orthogonal than Newton-Schulz) or ortho='newton-schulz'")
        return POLAR_EXPRESS_COEFFS[:steps], POLAR_EXPRESS_SAFETY
    raise ValueError(f"ortho must be one of {ORTHO_METHODS}, got {method!r}")


@torch.no_grad()
def orthogonalize(G, steps=5, method="newton-schulz"):
    """Approximate U V^T of G = U S V^T, in bf16 (fast on tensor cores / AMX, accurate enough).
    G is a matrix or a stack of same-shape matrices (batched: one bmm per product for all of them).
    method: "newton-schulz" (one fixed quintic, any number of steps) or "polar-express" (a different
    quintic per step, at most 5 steps)."""
    assert G.ndim in (2, 3), "orthogonalize expects a matrix or a stack of matrices"
    coeffs, safety = _ortho_coeffs(method, steps)
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:  # iterate on the wide orientation so X X^T is the smaller Gram matrix
        X = X.mT
    # Frobenius >= spectral norm: singular values in [0, 1 / safety]
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * safety + 1e-7)
    mm_add = torch.baddbmm if X.ndim == 3 else torch.addmm
    for a, b, c in coeffs:
        A = X @ X.mT
        B = mm_add(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = mm_add(X, B, X, beta=a)  # a X + B X
    return X.mT if tall else X


@torch.no_grad()
def normuon_scale(O, states, beta2, eps=1e-10):
    """NorMuon (Li et al. 2025, arXiv 2510.05491): per-neuron adaptive scale of the orthogonalized update O, a
    stack (n, rows, cols); returns the fp32 factors to multiply it by, (n, rows, 1) or (n, 1, cols) (muon_apply
    folds them into the parameter update, so the rescaled stack is never materialised).

    One second-moment value per entry of the larger dimension (per row when rows >= cols, as upstream nanochat),
    averaging O^2 along the smaller one. The other choice would do nothing: a semi-orthogonal matrix has
    orthonormal columns when tall (every column norm is 1) and orthonormal rows when wide, so only the larger
    dimension's slices differ in size. With that mean m, states[i]["second_moment"] (fp32, (rows, 1) or
    (1, cols)) keeps v = beta2 v + (1 - beta2) m, and O_hat = O / sqrt(v + eps), rescaled to O's Frobenius norm
    so the learning rate keeps its meaning: only the distribution across neurons changes. No bias correction:
    with v starting at 0 it is v's true value times (1 - beta2^t), one scalar for every neuron, which the
    rescale to ||O|| cancels. One pass over O: its slices' squared norms give m and both Frobenius norms
    (||O_hat||^2 = sum of the slices' squared norms times their factor squared)."""
    dim = -1 if O.size(-2) >= O.size(-1) else -2
    sum_sq = torch.linalg.vector_norm(O, dim=dim, keepdim=True, dtype=torch.float32).square()  # (n, rows, 1) or (n, 1, cols)
    for st, m in zip(states, sum_sq / O.size(dim)):
        if "second_moment" not in st:
            st["second_moment"] = torch.zeros_like(m)
        st["second_moment"].lerp_(m, 1 - beta2)
    scale = (torch.stack([st["second_moment"] for st in states]) + eps).rsqrt()
    norm_ratio = (sum_sq.sum(dim=(-2, -1), keepdim=True).sqrt()
                  / (sum_sq * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(eps))
    return scale * norm_ratio


@torch.no_grad()
def muon_apply(params, grads, states, group):
    """Momentum, orthogonalization (batched over same-shape matrices: the blocks' q/k/v/proj and MLP
    matrices come in a few shapes), optional NorMuon scaling, decoupled weight decay and the scaled step
    for these parameters. Every setting is read from `group` now, so a schedule may change any of them
    between steps. Weight decay uses the weights before this step's update (as AdamW here):
    p <- p - lr * wd * mask * p - lr * u, with u = sqrt(max(1, rows/cols)) * O the update direction and
    mask = 1, or with cautious_wd (Chen et al. 2025, arXiv 2510.12402) mask = (u * p > 0): decay only
    the entries the update already moves towards zero. The per-parameter tail is written for few passes
    over memory (the bf16 update added into p as it is, the NorMuon factors and the 0/1 mask folded into
    addcmul_): on CPU these elementwise passes, not the matmuls, are what the variants add to a step."""
    by_shape, momentum = {}, group["momentum"]
    lr, wd, beta2 = group["lr"], group["weight_decay"], group["normuon_beta2"]
    for p, g, st in zip(params, grads, states):
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(g)
        buf = st["momentum_buffer"]
        buf.lerp_(g, 1 - momentum)  # buf = momentum * buf + (1 - momentum) * grad
        update = g.lerp(buf, momentum) if group["nesterov"] else buf
        by_shape.setdefault(tuple(p.shape), []).append((p, update, st))
    for (rows, cols), items in by_shape.items():
        ortho = orthogonalize(torch.stack([u for _, u, _ in items]), group["ns_steps"], group["ortho"])
        scale = normuon_scale(ortho, [st for _, _, st in items], beta2) if beta2 else None
        # an orthogonal update has RMS ~1/sqrt(max dim); tall matrices get sqrt(rows/cols) more
        alpha = -lr * max(1.0, rows / cols) ** 0.5
        for i, (p, _, _) in enumerate(items):
            o = ortho[i]
            if wd and group["cautious_wd"]:  # sign(u) = sign(o): the scales are positive
                p.addcmul_(p, torch.mul(o, p).gt_(0), value=-lr * wd)
            elif wd:
                p.mul_(1 - lr * wd)
            if scale is None:
                p.add_(o, alpha=alpha)
            else:
                p.addcmul_(o, scale[i], value=alpha)


MUON_VARIANT_DEFAULTS = dict(ortho="newton-schulz", normuon_beta2=0.0, weight_decay=0.0, cautious_wd=False)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters only (the matrices inside the transformer blocks). The defaults are plain
    Muon; ortho="polar-express", normuon_beta2 > 0 (NorMuon; upstream uses 0.95), weight_decay > 0 and
    cautious_wd switch on the variants (see orthogonalize, normuon_scale, muon_apply). All settings live
    in the param groups. State per matrix: "momentum_buffer", plus "second_moment" with NorMuon."""

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, ortho="newton-schulz",
                 normuon_beta2=0.0, weight_decay=0.0, cautious_wd=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ortho=ortho,
                                      normuon_beta2=normuon_beta2, weight_decay=weight_decay, cautious_wd=cautious_wd))
        for group in self.param_groups:
            _ortho_coeffs(group["ortho"], group["ns_steps"])  # ValueError: unknown method, too many steps
            if not 0.0 <= group["normuon_beta2"] < 1.0:
                raise ValueError(f"normuon_beta2 must be in [0, 1) (0 turns NorMuon off), got {group['normuon_beta2']}")
            if group["weight_decay"] < 0:
                raise ValueError(f"weight_decay must be >= 0 (0 turns it off), got {group['weight_decay']}")
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only handles 2-D parameters, got shape {tuple(p.shape)}")

    def __setstate__(self, state):
        """load_state_dict replaces the param groups by the saved ones: a checkpoint from before the
        variants existed lacks their keys, which mean plain Muon."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in MUON_VARIANT_DEFAULTS.items():
                group.setdefault(key, value)

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
