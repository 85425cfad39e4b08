"""
Hand-written autograd functions behind the model's hot paths, kept apart from nanochat/gpt.py so the
model file reads as the model. Each exists because the composed PyTorch version was measured slower
or held more memory (figures in docs/benchmarks.md and docs/model.md); each is tested against the
composed reference in tests/test_gpt.py.

- causal_attention: plain causal attention (training, a prefill into an empty cache); compiled CPU
  training with gradients takes CausalAttentionRecompute (~10% of a d6 fwd+bwd), everything else SDPA.
- decode_attention: a decode step (one query per row); compiled on CPU, batched matmuls that inductor fuses.
- SoftcapCrossEntropy: the per-token losses (loss_reduction "none": evaluation, RL).
- ChunkedHeadLoss: the training loss, the head matmul included, a chunk of token rows at a time.
_capped, _token_losses and _logit_grads are the softcap, losses and logits' gradient both losses share;
_losses_and_grads is the two at once for eager CPU training (1.2-1.7x faster than the two in turn).
"""
import torch
import torch.nn.functional as F

# Above this many attention scores (batch x heads x T x T) the recomputing backward's fp32 score
# matrices would cost too much memory; the flash kernel's own backward is used instead.
RECOMPUTE_ATTENTION_MAX_SCORES = 1 << 26


class CausalAttentionRecompute(torch.autograd.Function):
    """Causal attention for compiled CPU training: the flash kernel's forward, and a backward that
    recomputes the probabilities from the saved logsumexp with batched matmuls. Inductor fuses the
    elementwise work of that backward; on CPU it runs ~2x faster than the flash kernel's own
    backward (bench/train_step.py). GQA: each KV head's group of query heads is treated as G x T
    rows against the head's T keys, so K/V are only repeated for the forward kernel."""

    @staticmethod
    def forward(ctx, q, k, v):
        group = q.size(1) // k.size(1)
        kf, vf = (k, v) if group == 1 else (k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))
        scale = q.size(-1) ** -0.5
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, kf, vf, is_causal=True, scale=scale)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv = k.size(1)
        rows = (B, Hkv, H // Hkv * T, D)  # query head h = kv head h // G, as in SDPA's enable_gqa
        qg, dog, og = q.reshape(rows), grad_out.reshape(rows), out.reshape(rows)
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril().repeat(H // Hkv, 1)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * ctx.scale
        p = torch.exp(scores - lse.reshape(B, Hkv, -1, 1)).masked_fill(~causal, 0.0)
        dv = torch.matmul(p.to(v.dtype).transpose(-1, -2), dog)
        dp = torch.matmul(dog, v.transpose(-1, -2)).float()
        delta = (dog.float() * og.float()).sum(-1, keepdim=True)  # = rowsum(P * dP)
        ds = (p * (dp - delta) * ctx.scale).to(q.dtype)
        dq = torch.matmul(ds, k).view(B, H, T, D)
        dk = torch.matmul(ds.transpose(-1, -2), qg)
        return dq, dk, dv


def causal_attention(q, k, v):
    """Causal self-attention of (B, H, T, D) queries over (B, Hkv, T, D) keys and values."""
    B, H, T, _ = q.shape
    if (q.device.type == "cpu" and torch.compiler.is_compiling() and torch.is_grad_enabled() and q.requires_grad
            and B * H * T * T <= RECOMPUTE_ATTENTION_MAX_SCORES):
        return CausalAttentionRecompute.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != k.size(1))


def decode_attention(q, k, v, mask, enable_gqa):
    """A decode step's attention: one query per row, (B, H, 1, D), over (B, Hkv, Tk, D) cached keys and values,
    `mask` None or broadcastable to (B, 1, 1, Tk); enable_gqa a Python bool, H != Hkv from the config (with
    dynamic shapes the sizes here are symbols, and SDPA takes no symbolic bool).
    Compiled on CPU it is two batched matmuls and a softmax (scores in fp32, as the flash kernel keeps them),
    which inductor fuses: the flash kernel, called from the graph, works per (row, head) block, and a compiled
    decode step with it took 1.3-1.5x as long at 1-16 rows (docs/benchmarks.md, continuous batching). Eager, the
    composed version's extra ops cancel its gain, so SDPA stays. GQA: a KV head's G query heads are G rows
    against its keys."""
    B, H, _, D = q.shape
    Hkv = k.size(1)
    if (q.device.type != "cpu" or not torch.compiler.is_compiling()
            or (mask is not None and mask.dim() == 4 and mask.size(1) != 1)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)
    with torch.autocast(q.device.type, enabled=False):  # autocast would take the scores' matmul to bf16
        scores = q.reshape(B, Hkv, H // Hkv, D).float() @ k.float().transpose(-1, -2) * D**-0.5  # (B, Hkv, G, Tk)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1).to(v.dtype) @ v).view(B, H, 1, D)


# Up to this softcap the capped logits' logsumexp is taken with the constant shift by cap instead of a row max
# (_token_losses, _losses_and_grads): e^(-2 cap) cannot underflow in fp32.
SHIFT_CAP_MAX = 40


def _capped(logits, cap):
    """fp32 cap * tanh(logits / cap) (cap 0: the logits in fp32). Under torch.compile tanh is written as
    1 - 2 / (exp(2x) + 1): inductor's vectorized exp is ~2x faster than its tanh on CPU. In eager mode a
    fresh fp32 copy is made, so callers may modify the result in place."""
    if torch.compiler.is_compiling():
        return cap - 2 * cap / (torch.exp(logits.float() * (2 / cap)) + 1) if cap else logits.float()
    z = logits.to(torch.float32, copy=True)
    return z.div_(cap).tanh_().mul_(cap) if cap else z


def _token_losses(logits, safe, valid, cap):
    """Per-token cross-entropy (0 where not valid) of the capped logits, and their logsumexp."""
    z = _capped(logits, cap)
    if 0 < cap <= SHIFT_CAP_MAX:
        # capped logits lie in [-cap, cap], so a constant shift by cap replaces logsumexp's row max:
        # one reduction pass instead of two, no overflow
        shifted = torch.exp(z - cap) if torch.compiler.is_compiling() else z.sub_(cap).exp_()
        lse = cap + torch.log(shifted.sum(dim=-1))
    else:
        lse = torch.logsumexp(z, dim=-1)
    # the target's capped logit from the raw logits (so the (tokens, vocab) capped tensor need not be kept)
    picked = _capped(logits.gather(-1, safe[:, None]).squeeze(-1), cap)
    return torch.where(valid, lse - picked, 0.0), lse


def _logit_grads(logits, safe, lse, scale, cap):
    """d(loss) / d(raw logits) in the logits' dtype: (softmax(capped) - onehot) * dcapped/dlogits * scale,
    scale (tokens, 1) in fp32, 0 on ignored tokens. Recomputes the capped logits rather than storing them."""
    z = _capped(logits, cap)
    if torch.compiler.is_compiling():  # one fused pointwise pass
        onehot = torch.arange(logits.size(-1), device=logits.device)[None, :] == safe[:, None]
        grad = (torch.exp(z - lse[:, None]) - onehot.float()) * scale
        if cap:
            t = z / cap
            grad = grad * (1 - t * t)
        return grad.to(logits.dtype)
    grad = torch.sub(z, lse[:, None]).exp_()  # softmax of the capped logits
    grad.scatter_add_(-1, safe[:, None], torch.full_like(lse[:, None], -1.0))  # minus one-hot
    grad.mul_(scale)  # upstream gradient (0 for ignored targets)
    if cap:
        t = z.div_(cap)
        grad.addcmul_(grad, t.square_(), value=-1)  # chain rule through the cap: * (1 - t^2)
    return grad.to(logits.dtype)


def _losses_and_grads(logits, safe, valid, cap):
    """Eager, 0 < cap <= SHIFT_CAP_MAX: _token_losses and _logit_grads (scale: valid) of one chunk together, in 10
    passes over the (tokens, vocab) tensor instead of their 18: t = tanh(logits / cap) is kept, the softmax is
    e^(cap t - cap) over its row sum (the constant shift of _token_losses) and the cap's derivative is 1 - t^2
    (nothing recomputed)."""
    t = logits.to(torch.float32, copy=True).div_(cap).tanh_()
    e = torch.add(t.new_tensor(-cap), t, alpha=cap).exp_()  # e^(z - cap) for the capped logits z = cap t
    total = e.sum(dim=-1)
    lse = cap + torch.log(total)
    loss = torch.where(valid, lse - cap * t.gather(-1, safe[:, None]).squeeze(-1), 0.0)
    scale = valid.float()
    grad = e.mul_((scale / total)[:, None])  # softmax x the upstream gradient (0 for ignored targets)
    grad.scatter_add_(-1, safe[:, None], -scale[:, None])  # minus one-hot
    return loss, grad.addcmul_(grad, t.square_(), value=-1).to(logits.dtype)  # chain rule through the cap


class SoftcapCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of cap * tanh(logits / cap) (cap 0: of the logits), computed in fp32 from
    (bf16 or fp32) logits. Same values as F.cross_entropy on softcapped logits, but cheaper: nothing of
    size (tokens, vocab) is saved in fp32 (the backward recomputes the cap from the logits and uses the
    saved logsumexp); under torch.compile the backward is one fused pointwise pass, in eager mode
    in-place ops keep the number of passes over the (tokens, vocab) tensor low. Ignored targets (-1)
    give loss 0 and no gradient. Used for per-token losses (loss_reduction="none": evaluation, RL)."""

    @staticmethod
    def forward(ctx, logits, targets, cap):
        valid = targets != -1
        safe = torch.where(valid, targets, 0)
        loss, lse = _token_losses(logits, safe, valid, cap)
        ctx.save_for_backward(logits, safe, valid, lse)
        ctx.cap = cap
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        logits, safe, valid, lse = ctx.saved_tensors
        scale = torch.where(valid, grad_loss, 0.0)[:, None]
        return _logit_grads(logits, safe, lse, scale, ctx.cap), None, None


# Token rows of the (tokens, vocab) logits ChunkedHeadLoss holds at a time; None: by device. CPU: 1,024 rows
# (oneDNN's fastest head matmuls, measured). Accelerators: ~2^29 logits a chunk (1 GiB in bf16; 8,192 rows at
# vocab 65,536), so the head gradient's fp32 accumulation runs a few times a step.
HEAD_CHUNK_ROWS = None


class ChunkedHeadLoss(torch.autograd.Function):
    """The head matmul and the (softcapped) cross-entropy, summed over the valid tokens, computed a chunk
    of tokens (HEAD_CHUNK_ROWS) at a time, with the gradients computed during the forward while each
    chunk's logits are at hand (the backward only scales them by the upstream gradient). Why:
    - memory: the (tokens, vocab) logits never exist whole (depth 20 at batch 32 x 2048 tokens and vocab
      65536: 8.6 GB of bf16 logits plus their gradient, versus 1 GB a chunk);
    - speed on CPU: oneDNN runs the head's matmuls much faster on chunks of rows (measured 24 ms vs 54 ms
      for 4096 x 384 x 8192 in bf16 on one core) and the chunk's softmax work stays closer to the cache.
    x (N, C) in the compute dtype or fp32 (cast to the autocast dtype when autocast is on), weight (V, C),
    targets (N,) with -1 ignored, grad_enabled: the caller's torch.is_grad_enabled() (no gradients are
    computed without it). Returns the summed loss (fp32 scalar)."""

    @staticmethod
    def forward(ctx, x, weight, targets, cap, grad_enabled):
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        # (forward runs with grad mode off, and needs_input_grad ignores the caller's no_grad: hence the flag)
        needs_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            valid = targets != -1
            safe = torch.where(valid, targets, 0)
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            grad_x = torch.empty_like(x) if needs_grad else None
            grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
            chunk = HEAD_CHUNK_ROWS or (1024 if device_type == "cpu" else max(1024, 2 ** 29 // weight.size(0)))
            for start in range(0, x.size(0), chunk):
                rows = slice(start, start + chunk)
                xc = x[rows].to(dtype)
                logits = xc @ w.t()
                if needs_grad and 0 < cap <= SHIFT_CAP_MAX and not torch.compiler.is_compiling():
                    loss, g = _losses_and_grads(logits, safe[rows], valid[rows], cap)
                else:
                    loss, lse = _token_losses(logits, safe[rows], valid[rows], cap)
                    g = _logit_grads(logits, safe[rows], lse, valid[rows, None].float(), cap) if needs_grad else None
                total = total + loss.sum()
                if needs_grad:
                    grad_x[rows] = g @ w
                    grad_w += (g.t() @ xc).float()
        if needs_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_total, grad_w * grad_total, None, None, None
