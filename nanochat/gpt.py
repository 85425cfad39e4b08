"""
The GPT model. Reference design by default, every planned change (plan section 5.4) as a config value:
- token embedding, then RMSNorm without learnable parameters (also before attention, MLP and the head)
- rotary position embeddings (no learned positions), configurable base
- QK norm; grouped-query attention through scaled_dot_product_attention (enable_gqa, no K/V repeat)
- no biases; MLP with relu^2 (or gelu / silu), hidden size mlp_ratio * n_embd rounded to a multiple of 64
- logit softcap softcap * tanh(logits / softcap), in fp32
- untied lm_head by default; tie_embeddings=True reuses the embedding matrix as the head
One attention path serves training, chunked prefill against a KV cache, and single-token decode.

Build on the meta device, then materialize on the target device and initialize:
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()          # also (re)computes the rotary tables; load a state_dict after this
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = ("relu2", "gelu", "silu")


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10  # query heads
    n_kv_head: int = 10  # key/value heads (GQA when < n_head)
    n_embd: int = 1280
    mlp_ratio: float = 4.0
    activation: str = "relu2"  # relu2 | gelu | silu (plain, not gated: same parameter count for all three)
    tie_embeddings: bool = False
    softcap: float | None = 15.0  # 0 or None turns the logit softcap off
    rope_base: float = 10000.0

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def mlp_hidden_dim(self):
        """mlp_ratio * n_embd rounded to the nearest multiple of 64, halves up, at least 64: keeps matmuls
        on tile-friendly sizes. Exact for the reference (4 x 1280 = 5120) and for 3x / 2.5x at width 1280."""
        return max(64, 64 * math.floor(self.mlp_ratio * self.n_embd / 64 + 0.5))

    def validate(self):
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"GPTConfig.n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if self.head_dim % 2:
            raise ValueError(f"GPTConfig.n_head: head_dim = n_embd / n_head = {self.head_dim} must be even for rotary embeddings")
        if not isinstance(self.mlp_ratio, (int, float)) or isinstance(self.mlp_ratio, bool) or not self.mlp_ratio > 0:
            raise ValueError(f"GPTConfig.mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"GPTConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if self.softcap is not None and (not isinstance(self.softcap, (int, float)) or self.softcap < 0):
            raise ValueError(f"GPTConfig.softcap must be >= 0 or None (0/None = off), got {self.softcap!r}")
        if not isinstance(self.rope_base, (int, float)) or not self.rope_base > 0:
            raise ValueError(f"GPTConfig.rope_base must be a positive number, got {self.rope_base!r}")
        return self


def config_for_depth(depth, vocab_size, sequence_len=2048, head_dim=128, **knobs):
    """The reference sizing rule: width 64 * depth, heads of about head_dim channels. If n_embd // head_dim
    heads do not divide the width, the largest head count below it that does is used. Other GPTConfig
    fields (n_kv_head, mlp_ratio, activation, tie_embeddings, softcap, rope_base) pass through `knobs`."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    allowed = {f.name for f in fields(GPTConfig)} - {"n_layer", "n_embd", "n_head", "vocab_size", "sequence_len"}
    unknown = set(knobs) - allowed
    if unknown:
        raise ValueError(f"config_for_depth: unknown config field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    n_embd = 64 * depth
    n_head = max(1, n_embd // head_dim)
    while n_embd % n_head:
        n_head -= 1
    knobs.setdefault("n_kv_head", n_head)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_embd=n_embd, **knobs).validate()


# -----------------------------------------------------------------------------

def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (i, i + D/2) by position-dependent angles. x: (B, T, H, D), cos/sin: (1, T, 1, D/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


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


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, cos, sin, kv_cache):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # QK norm then rotary (the rotation preserves the norm, so the order does not matter)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = apply_rotary(norm(q), cos, sin).transpose(1, 2)  # (B, H, T, D)
        k = apply_rotary(norm(k), cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
        Tk = k.size(2)
        gqa = self.n_kv_head != self.n_head
        if Tk == T:  # training, or a prefill into an empty cache: plain causal
            y = causal_attention(q, k, v)
        elif T == 1:  # decode: the one new query sees every cached position
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # chunk after cached tokens: sees the whole prefix, causal inside the chunk
            prefix = Tk - T
            mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.mlp_hidden_dim
        self.activation = config.activation
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        x = self.c_fc(x)
        if self.activation == "relu2":
            x = F.relu(x).square()
        elif self.activation == "gelu":
            x = F.gelu(x)
        else:
            x = F.silu(x)
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache):
        x = x + self.attn(norm(x), cos, sin, kv_cache)
        x = x + self.mlp(norm(x))
        return x


def _capped(logits, cap):
    """fp32 cap * tanh(logits / cap) (cap 0: the logits in fp32). Under torch.compile tanh is written as
    1 - 2 / (exp(2x) + 1): inductor's vectorized exp is ~2x faster than its tanh on CPU. In eager mode a
    fresh fp32 copy is made, so callers may modify the result in place."""
    if not cap:
        return logits.float() if torch.compiler.is_compiling() else logits.to(torch.float32, copy=True)
    if torch.compiler.is_compiling():
        return cap - 2 * cap / (torch.exp(logits.float() * (2 / cap)) + 1)
    return logits.to(torch.float32, copy=True).div_(cap).tanh_().mul_(cap)


def _token_losses(logits, safe, valid, cap):
    """Per-token cross-entropy (0 where not valid) of the capped logits, and their logsumexp."""
    z = _capped(logits, cap)
    if cap and cap <= 40:
        # capped logits lie in [-cap, cap], so a constant shift by cap replaces logsumexp's row max:
        # one reduction pass instead of two, no overflow, and e^(-2 cap) cannot underflow for cap <= 40
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


HEAD_CHUNK_ROWS = None  # token rows of (tokens, vocab) logits ChunkedHeadLoss holds at a time; None: by device


def head_chunk_rows(device_type, vocab_size):
    """CPU: 1,024 rows (oneDNN's fastest head matmuls, measured). Accelerators: ~2^29 logits a chunk (1 GiB
    in bf16; 8,192 rows at vocab 65,536), so the head gradient's fp32 accumulation runs a few times a step."""
    if HEAD_CHUNK_ROWS is not None:
        return HEAD_CHUNK_ROWS
    return 1024 if device_type == "cpu" else max(1024, 2 ** 29 // vocab_size)


class ChunkedHeadLoss(torch.autograd.Function):
    """The head matmul and the (softcapped) cross-entropy, summed over the valid tokens, computed
    head_chunk_rows() tokens at a time, with the gradients computed during the forward while each chunk's
    logits are at hand (the backward only scales them by the upstream gradient). Why:
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
            chunk = head_chunk_rows(device_type, weight.size(0))
            for start in range(0, x.size(0), chunk):
                rows = slice(start, start + chunk)
                xc = x[rows].to(dtype)
                logits = xc @ w.t()
                loss, lse = _token_losses(logits, safe[rows], valid[rows], cap)
                total = total + loss.sum()
                if needs_grad:
                    g = _logit_grads(logits, safe[rows], lse, valid[rows, None].float(), cap)
                    grad_x[rows] = g @ w
                    grad_w += (g.t() @ xc).float()
        if needs_grad:
            ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_total, grad_w * grad_total, None, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config.validate()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        # tied: no lm_head module at all, so the state_dict and parameter count hold the matrix once
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables are derived state (not saved); 10x the training length leaves room for long
        # generations, and forward() extends them if a KV cache ever goes further.
        self.rotary_len = config.sequence_len * 10
        cos, sin = self._rotary_tables(self.rotary_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, length, device=None):
        half = self.config.head_dim // 2
        inv_freq = self.config.rope_base ** -(torch.arange(0, half, dtype=torch.float32, device=device) / half)
        t = torch.arange(length, dtype=torch.float32, device=device)
        angles = torch.outer(t, inv_freq)[None, :, None, :]  # (1, T, 1, D/2)
        return angles.cos(), angles.sin()

    @torch.no_grad()
    def init_weights(self):
        """Reference initialization (normal std given). Untied: embedding std 1; q/k/v/c_fc std n_embd**-0.5; the output
        projections (attn c_proj, mlp c_proj) and lm_head zero, so every block starts as the identity and
        the first logits are uniform. Tied: one matrix cannot be both std 1 and zero, and a large tied
        matrix has a trap: with the blocks starting as the identity, the final hidden state is the
        normalized embedding of the input token, so the head gives that same token the logit
        ||w||^2 / rms(w) = n_embd * std while other logits have std sqrt(n_embd) * std (at std n_embd**-0.5
        that is 36 vs 1 at width 1280: the model starts out predicting "repeat the input"). We use
        std n_embd**-0.75: the self-logit is n_embd**0.25 (~6 at width 1280, e^6 << vocab), the others
        ~0, so the first loss is ~ln(vocab) as with the zero head. As an embedding the scale does not
        matter (an RMSNorm follows the lookup) and the entries stay far above the norm's eps. The
        matrix gets the head's LR (see setup_optimizers)."""
        d = self.config.n_embd
        wte = self.transformer.wte.weight
        if self.config.tie_embeddings:
            nn.init.normal_(wte, mean=0.0, std=d ** -0.75)
        else:
            nn.init.normal_(wte, mean=0.0, std=1.0)
            nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.normal_(lin.weight, mean=0.0, std=d ** -0.5)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.cos, self.sin = self._rotary_tables(self.rotary_len, device=wte.device)

    def get_device(self):
        return self.transformer.wte.weight.device

    # -------------------------------------------------------------------------
    # Bookkeeping

    def num_params_by_group(self):
        """Parameter counts: embedding, head (0 when tied: the shared matrix counts as embedding),
        attention, mlp, total. Works on the meta device."""
        attn = sum(p.numel() for b in self.transformer.h for p in b.attn.parameters())
        mlp = sum(p.numel() for b in self.transformer.h for p in b.mlp.parameters())
        emb = self.transformer.wte.weight.numel()
        head = 0 if self.lm_head is None else self.lm_head.weight.numel()
        total = sum(p.numel() for p in self.parameters())
        assert total == emb + head + attn + mlp
        return dict(embedding=emb, head=head, attention=attn, mlp=mlp, total=total)

    def estimate_flops(self):
        """Training FLOPs per token: 6 x (matmul params: blocks + the head, counted once when tied; the
        embedding lookup is no matmul) + 12 * n_layer * n_head * head_dim * sequence_len for the attention
        scores and weighted sum (forward 4 * T * D per head, backward twice that; the causal mask's
        skipped half is not subtracted, as in the reference)."""
        c = self.config
        g = self.num_params_by_group()
        matmul_params = g["attention"] + g["mlp"] + c.vocab_size * c.n_embd
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len

    # -------------------------------------------------------------------------

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         adam_betas=(0.8, 0.95)):
        """Muon for the 2-D matrices inside the blocks, AdamW for embedding and head. AdamW LRs scale
        as (n_embd / 768) ** -0.5 like the reference (tuned at width 768). The tied matrix is one
        AdamW group at the head's LR: Adam steps are a fixed size per element, and an embedding-sized
        step (0.2) would be several times the tied matrix's entries (std n_embd**-0.75); the embedding use
        does not care about scale (RMSNorm follows it), the head use does. Under torch.distributed
        with world_size > 1 the sharded versions are returned; they average gradients themselves, so
        do not wrap the model in DDP. Every param group carries "initial_lr" for LR schedules."""
        from nanochat.optim import AdamW, DistAdamW, DistMuon, Muon
        import torch.distributed as dist
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        scale = (self.config.n_embd / 768) ** -0.5
        matrix_params = [p for p in self.transformer.h.parameters()]
        wte = self.transformer.wte.weight
        if self.config.tie_embeddings:
            adam_groups = [dict(params=[wte], lr=unembedding_lr * scale)]
        else:
            adam_groups = [dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
                           dict(params=[wte], lr=embedding_lr * scale)]
        assert len(matrix_params) + sum(len(g["params"]) for g in adam_groups) == len(list(self.parameters()))
        adam_cls, muon_cls = (DistAdamW, DistMuon) if distributed else (AdamW, Muon)
        adamw = adam_cls(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay)
        muon = muon_cls(matrix_params, lr=matrix_lr, momentum=0.95)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        return optimizers

    # -------------------------------------------------------------------------

    def _head(self, x):
        return F.linear(x, self.transformer.wte.weight) if self.lm_head is None else self.lm_head(x)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """idx (B, T) token ids. Returns fp32 logits (B, T, V) when targets is None, else the
        cross-entropy loss (targets == -1 ignored): a scalar for "mean"/"sum", (B, T) for "none"
        (ignored positions are 0). With a kv_cache, the chunk sits at positions [pos, pos + T).
        last_only=True (no targets): logits of the last position only, (B, 1, V); a prompt prefill
        needs no more, and the head over every position would cost more than the blocks at small widths."""
        if last_only and targets is not None:
            raise ValueError("last_only=True returns logits; it cannot be combined with targets")
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        if T0 + T > self.cos.size(1):  # only reachable in long generations, never in training
            self.rotary_len = 2 * (T0 + T)
            self.cos, self.sin = self._rotary_tables(self.rotary_len, device=idx.device)
        cos, sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        wte = self.transformer.wte
        x = norm(wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache)
        if last_only:
            x = x[:, -1:]
        x = norm(x)
        cap = float(self.config.softcap or 0.0)
        if targets is None:
            logits = self._head(x).float()
            return cap * torch.tanh(logits / cap) if cap else logits
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        targets = targets.reshape(-1)
        if loss_reduction == "none":  # per-token losses (evaluation, RL): whole logits, per-token gradients
            logits = self._head(x)
            loss = SoftcapCrossEntropy.apply(logits.view(-1, logits.size(-1)), targets, cap)
        else:  # training: the head's matmul happens inside, by chunks (lm_head's forward hooks do not run)
            head = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
            loss = ChunkedHeadLoss.apply(x.reshape(-1, x.size(-1)), head, targets, cap, torch.is_grad_enabled())
            if loss_reduction == "mean":
                loss = loss / (targets != -1).sum()
        return loss.view(B, T) if loss_reduction == "none" else loss


# -----------------------------------------------------------------------------
# python -m nanochat.gpt --depth=20 --tie_embeddings=true ...: print the parameter breakdown (meta device)

def format_param_table(config):
    with torch.device("meta"):
        model = GPT(config)
    g = model.num_params_by_group()
    lines = [f"| group | parameters | share |", "| --- | ---: | ---: |"]
    for name in ("embedding", "head", "attention", "mlp", "total"):
        lines.append(f"| {name} | {g[name]:,} | {100 * g[name] / g['total']:.1f}% |")
    lines.append(f"\ntraining FLOPs per token: {model.estimate_flops():.4g}")
    return "\n".join(lines)


if __name__ == "__main__":
    from nanochat.common import make_parser, positive_int, str2bool
    parser = make_parser("Print the GPT parameter breakdown for a config (built on the meta device).")
    parser.add_argument("--depth", type=positive_int, default=20)
    parser.add_argument("--vocab_size", type=positive_int, default=65536)
    parser.add_argument("--sequence_len", type=positive_int, default=2048)
    parser.add_argument("--n_kv_head", type=positive_int, default=None, help="default: n_head")
    parser.add_argument("--mlp_ratio", type=float, default=4.0)
    parser.add_argument("--activation", choices=ACTIVATIONS, default="relu2")
    parser.add_argument("--tie_embeddings", type=str2bool, default=False)
    parser.add_argument("--softcap", type=float, default=15.0)
    parser.add_argument("--rope_base", type=float, default=10000.0)
    args = parser.parse_args()
    knobs = dict(mlp_ratio=args.mlp_ratio, activation=args.activation, tie_embeddings=args.tie_embeddings,
                 softcap=args.softcap, rope_base=args.rope_base)
    if args.n_kv_head is not None:
        knobs["n_kv_head"] = args.n_kv_head
    try:
        cfg = config_for_depth(args.depth, args.vocab_size, args.sequence_len, **knobs)
    except ValueError as e:
        parser.error(str(e))
    print(cfg)
    print(format_param_table(cfg))
