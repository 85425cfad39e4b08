"""
The GPT model. Reference design by default, each of the first user's planned changes as a config value:
- token embedding, then RMSNorm without learnable parameters (also before attention, MLP and the head)
- rotary position embeddings (no learned positions), configurable base
- QK norm; grouped-query attention through scaled_dot_product_attention (enable_gqa, no K/V repeat)
- no biases; MLP with relu^2 (or gelu / silu), hidden size mlp_ratio * n_embd rounded to a multiple of 64
- logit softcap softcap * tanh(logits / softcap), in fp32
- untied lm_head by default; tie_embeddings=True reuses the embedding matrix as the head
- the 2026 recipe's parts, each a config field, off by default: per-layer residual scalars, gated value
  embeddings on alternating layers, sliding-window attention by a per-layer pattern
One attention path serves training, chunked prefill against a KV cache, and single-token decode.

Build on the meta device, then materialize on the target device and initialize:
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()          # also (re)computes the rotary tables; load a state_dict after this

The architecture flags that build a GPTConfig, the first user's planned changes and the recipe changes are
declared in nanochat/recipe.py; the hand-written autograd functions of the hot paths are in nanochat/kernels.py.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import dist_rank_world
from nanochat.kernels import ChunkedHeadLoss, SoftcapCrossEntropy, causal_attention, decode_attention

ACTIVATIONS = {"relu2": lambda x: F.relu(x).square(), "gelu": F.gelu, "silu": F.silu}  # name -> function
MAX_SEQUENCE_LEN = 1 << 20
VE_GATE_CHANNELS = 32  # a value-embedding gate reads this many leading channels of its layer's input


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
    residual_scalars: bool = False  # learnable per-layer x = resid_lambda * x + x0_lambda * x0 before each block
    value_embeds: bool = False  # gated value embeddings on alternating layers, the last one included
    window_pattern: str = "L"  # per layer, tiled: L = full context, S = a window of sequence_len // 2; last layer L

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def mlp_hidden_dim(self):
        """mlp_ratio * n_embd rounded to the nearest multiple of 64, halves up, at least 64: keeps matmuls
        on tile-friendly sizes. Exact for the reference (4 x 1280 = 5120) and for 3x / 2.5x at width 1280."""
        return max(64, 64 * math.floor(self.mlp_ratio * self.n_embd / 64 + 0.5))

    def has_value_embed(self, layer_idx):
        """Value embeddings sit on every other layer counting back from the last (which always has one)."""
        return self.value_embeds and (self.n_layer - 1 - layer_idx) % 2 == 0

    def layer_windows(self):
        """Per layer, how many positions a query sees back (itself included): window_pattern tiled over the
        layers, S = sequence_len // 2, L = everything (None); the last layer is always L, so the final
        representation sees the whole context."""
        pattern = (self.window_pattern * self.n_layer)[:self.n_layer - 1] + "L"
        return [None if c == "L" else max(1, self.sequence_len // 2) for c in pattern]

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
        if self.sequence_len > MAX_SEQUENCE_LEN:  # the rotary tables hold 10x this many positions
            raise ValueError(f"GPTConfig.sequence_len must be at most {MAX_SEQUENCE_LEN}, got {self.sequence_len}")
        for name in ("mlp_ratio", "rope_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"GPTConfig.{name} must be a positive finite number, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        for name in ("tie_embeddings", "residual_scalars", "value_embeds"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if (not isinstance(self.window_pattern, str) or not 0 < len(self.window_pattern) <= 64
                or set(self.window_pattern) - {"S", "L"}):
            raise ValueError(f"GPTConfig.window_pattern must be 1-64 letters S (window) / L (full), got {self.window_pattern!r}")
        if self.softcap is not None and (isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float))
                                         or not 0 <= self.softcap < float("inf")):
            raise ValueError(f"GPTConfig.softcap must be >= 0 or None (0/None = off), got {self.softcap!r}")
        return self


def largest_divisor(n, at_most):
    """The largest divisor of n that is at most `at_most` (1 when that is below 1)."""
    return max(d for d in range(1, max(1, at_most) + 1) if n % d == 0)


def config_for_depth(depth, vocab_size, sequence_len=2048, head_dim=128, **knobs):
    """The reference sizing rule: width 64 * depth, heads of about head_dim channels. If n_embd // head_dim
    heads do not divide the width, the largest head count below it that does is used. Other GPTConfig
    fields (n_kv_head, mlp_ratio, activation, tie_embeddings, softcap, rope_base) pass through `knobs`."""
    for name, value in (("depth", depth), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    allowed = {f.name for f in fields(GPTConfig)} - {"n_layer", "n_embd", "n_head", "vocab_size", "sequence_len"}
    if unknown := set(knobs) - allowed:
        raise ValueError(f"config_for_depth: unknown config field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    n_embd = 64 * depth
    n_head = largest_divisor(n_embd, n_embd // head_dim)
    knobs.setdefault("n_kv_head", n_head)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_embd=n_embd, **knobs).validate()


# -----------------------------------------------------------------------------

def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    """Rotate channel pairs (i, i + D/2) by position-dependent angles. x: (B, T, H, D), cos/sin: (1 or B, T, 1, D/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


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
        # value-embedding gate: one per KV head from the first channels of the input (zero: gate 1 at init)
        ve = config.has_value_embed(layer_idx)
        self.ve_gate = nn.Linear(min(VE_GATE_CHANNELS, config.n_embd), self.n_kv_head, bias=False) if ve else None

    def forward(self, x, cos, sin, kv_cache, ve=None, mask=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:  # v + 2 sigmoid(W x[:, :, :c]) * ve per KV head: the token's own value, added by a gate
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :self.ve_gate.in_features]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim).to(v.dtype)
        # QK norm then rotary (the rotation preserves the norm, so the order does not matter)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = apply_rotary(norm(q), cos, sin).transpose(1, 2)  # (B, H, T, D)
        k = apply_rotary(norm(k), cos, sin).transpose(1, 2)
        v = v.transpose(1, 2)
        # mask: a sliding window, GPT.forward's (the keys each query sees, rows' lengths included), or None
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache kept in another dtype
            if mask is None:  # rows at different lengths (continuous batching): which keys each row sees
                mask = kv_cache.row_mask
        Tk = k.size(2)
        if mask is None and T > 1 and Tk != T:  # a chunk after cached tokens: the whole prefix, causal inside it
            mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
        if mask is None and Tk == T:  # training, or a prefill into an empty cache: plain causal
            y = causal_attention(q, k, v)
        elif T == 1:  # a decode step: the new query sees every cached position (of its row, with a mask)
            y = decode_attention(q, k, v, mask, self.n_kv_head != self.n_head)
        else:  # a chunk with a mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation = config.activation
        self.c_fc = nn.Linear(config.n_embd, config.mlp_hidden_dim, bias=False)
        self.c_proj = nn.Linear(config.mlp_hidden_dim, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, ve=None, mask=None):
        x = x + self.attn(norm(x), cos, sin, kv_cache, ve, mask)
        return x + self.mlp(norm(x))


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
        # optional parts: created only when on, so a reference model's state_dict is unchanged
        if config.value_embeds:  # per VE layer a vocab x (n_kv_head * head_dim) table, added to that layer's values
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(config.vocab_size, kv_dim)
                                               for i in range(config.n_layer) if config.has_value_embed(i)})
        if config.residual_scalars:  # before block i: x = resid_lambdas[i] * x + x0_lambdas[i] * x0
            self.resid_lambdas = nn.Parameter(torch.empty(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.empty(config.n_layer))
        # Rotary tables are derived state (not saved); 10x the training length leaves room for long
        # generations, and forward() extends them if a KV cache ever goes further.
        cos, sin = self._rotary_tables(config.sequence_len * 10)
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
        """Reference initialization (normal stds). Untied: embedding 1; q/k/v/c_fc n_embd**-0.5; the output
        projections (attn and mlp c_proj) and lm_head zero, so every block starts as the identity and the
        first logits are uniform. Tied: one matrix cannot be both std 1 and zero, and a large one is a trap:
        with identity blocks the final hidden state is the input token's normalized embedding, so the head
        gives that token the logit ||w||^2 / rms(w) = n_embd * std, the others std sqrt(n_embd) * std (36 vs
        1 at std n_embd**-0.5, width 1280: the model starts out predicting "repeat the input"). At std
        n_embd**-0.75 the self-logit is n_embd**0.25 (~6 at width 1280, e^6 << vocab), the others ~0, so the
        first loss is ~ln(vocab) as with the zero head. As an embedding the scale does not matter (an RMSNorm
        follows the lookup; the entries stay far above its eps). The matrix gets the head's LR (setup_optimizers)."""
        d = self.config.n_embd
        wte = self.transformer.wte.weight
        nn.init.normal_(wte, mean=0.0, std=d ** -0.75 if self.config.tie_embeddings else 1.0)
        if self.lm_head is not None:
            nn.init.zeros_(self.lm_head.weight)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.normal_(lin.weight, mean=0.0, std=d ** -0.5)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        # the optional parts start where the reference network is: lambdas 1 and 0 leave x as it is; a value
        # embedding starts small (std of c_v's weights) next to values of RMS ~1
        for table in getattr(self, "value_embeds", {}).values():
            nn.init.normal_(table.weight, mean=0.0, std=d ** -0.5)
        if self.config.residual_scalars:
            nn.init.ones_(self.resid_lambdas)
            nn.init.zeros_(self.x0_lambdas)
        self.cos, self.sin = self._rotary_tables(self.cos.size(1), device=wte.device)

    def get_device(self):
        return self.transformer.wte.weight.device

    # -------------------------------------------------------------------------
    # Bookkeeping

    def num_params_by_group(self):
        """Parameter counts: embedding, head (0 when tied: the shared matrix counts as embedding),
        attention (value-embedding gates included), mlp, value_embeds (the tables), scalars (the residual
        lambdas), total, and scaling: the parameters a token's compute scales with (the blocks' matrices and
        the head, counted once when tied; no lookup table), on which the data:parameter ratio is set.
        Works on the meta device."""
        attn = sum(p.numel() for b in self.transformer.h for p in b.attn.parameters())
        mlp = sum(p.numel() for b in self.transformer.h for p in b.mlp.parameters())
        emb = self.transformer.wte.weight.numel()
        head = 0 if self.lm_head is None else self.lm_head.weight.numel()
        ve = sum(p.numel() for p in getattr(self, "value_embeds", nn.ModuleDict()).parameters())
        scalars = 2 * self.config.n_layer if self.config.residual_scalars else 0
        total = sum(p.numel() for p in self.parameters())
        assert total == emb + head + attn + mlp + ve + scalars
        scaling = attn + mlp + self.config.vocab_size * self.config.n_embd
        return dict(embedding=emb, head=head, attention=attn, mlp=mlp, value_embeds=ve, scalars=scalars,
                    total=total, scaling=scaling)

    def estimate_flops(self):
        """Training FLOPs per token: 6 x the scaling parameters (the matmuls: blocks + the head, counted once
        when tied; lookups and the per-layer scalars are no matmul) + 12 * n_head * head_dim per position a
        query attends to, summed over layers (sequence_len, or the window of an S layer), for the attention
        scores and weighted sum (forward 4 * T * D per head, backward twice that; the causal mask's skipped
        half is not subtracted, as in the reference)."""
        c = self.config
        attended = sum(min(w or c.sequence_len, c.sequence_len) for w in c.layer_windows())
        return 6 * self.num_params_by_group()["scaling"] + 12 * c.n_head * c.head_dim * attended

    # -------------------------------------------------------------------------

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         adam_betas=(0.8, 0.95), scalar_lr=0.5, muon_ortho="newton-schulz", normuon_beta2=0.0,
                         muon_weight_decay=0.0, cautious_wd=False):
        """Muon for the 2-D matrices inside the blocks, AdamW for embedding and head, its LRs scaled by
        (n_embd / 768) ** -0.5 like the reference (tuned at width 768). The tied matrix is one AdamW group at
        the head's LR: Adam steps are a fixed size per element, and an embedding-sized step (0.2) would be
        several times its entries (std n_embd**-0.75); the embedding use does not care about scale (RMSNorm
        follows it), the head use does. Value-embedding tables: AdamW at the embedding's LR. Residual scalars:
        AdamW without weight decay, x0_lambdas (additive, forgiving) at scalar_lr, resid_lambdas
        (multiplicative, compounding over layers) at scalar_lr / 100, as upstream measured. The muon_* options,
        normuon_beta2 and cautious_wd are Muon's (nanochat/optim.py). With world_size > 1 it returns the sharded
        versions, which average gradients themselves: do not wrap the model in DDP. Every param group carries
        "initial_lr" and "initial_weight_decay" for schedules."""
        from nanochat.optim import AdamW, DistAdamW, DistMuon, Muon
        scale = (self.config.n_embd / 768) ** -0.5
        matrix_params = list(self.transformer.h.parameters())
        wte = self.transformer.wte.weight
        if self.config.tie_embeddings:
            adam_groups = [dict(params=[wte], lr=unembedding_lr * scale)]
        else:
            adam_groups = [dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
                           dict(params=[wte], lr=embedding_lr * scale)]
        if self.config.value_embeds:
            adam_groups.append(dict(params=list(self.value_embeds.parameters()), lr=embedding_lr * scale))
        if self.config.residual_scalars:
            adam_groups += [dict(params=[self.resid_lambdas], lr=scalar_lr / 100, weight_decay=0.0),
                            dict(params=[self.x0_lambdas], lr=scalar_lr, weight_decay=0.0)]
        assert len(matrix_params) + sum(len(g["params"]) for g in adam_groups) == len(list(self.parameters()))
        adam_cls, muon_cls = (DistAdamW, DistMuon) if dist_rank_world()[1] > 1 else (AdamW, Muon)
        adamw = adam_cls(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay)
        muon = muon_cls(matrix_params, lr=matrix_lr, momentum=0.95, ortho=muon_ortho, normuon_beta2=normuon_beta2,
                        weight_decay=muon_weight_decay, cautious_wd=cautious_wd)
        for group in adamw.param_groups + muon.param_groups:
            group["initial_lr"], group["initial_weight_decay"] = group["lr"], group["weight_decay"]
        return [adamw, muon]

    # -------------------------------------------------------------------------

    @staticmethod
    def _window_mask(window, qpos, Tk, row_mask=None):
        """(B or 1, 1, T, Tk) bool over Tk keys, True where the query at absolute position qpos[b, i] may see key
        j: causal and j > qpos - window; with rows at their own lengths, also within the row's (row_mask). None
        when the window reaches back past position 0 for every query (the full-attention paths serve it)."""
        if window >= Tk:
            return None
        back = qpos[:, None, :, None] - torch.arange(Tk, device=qpos.device)  # how far back key j is
        mask = (back >= 0) & (back < window)
        return mask & row_mask if row_mask is not None else mask

    def _head(self, x):
        return F.linear(x, self.transformer.wte.weight) if self.lm_head is None else self.lm_head(x)

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", last_only=False):
        """idx (B, T) token ids. Returns fp32 logits (B, T, V) when targets is None, else the
        cross-entropy loss (targets == -1 ignored): a scalar for "mean"/"sum", (B, T) for "none"
        (ignored positions are 0). With a kv_cache, the chunk sits at positions [pos, pos + T).
        last_only=True (no targets): logits of the last position only, (B, 1, V); a prompt prefill
        needs no more, and the head over every position would cost more than the blocks at small widths.
        last_only may also be a (B,) tensor of positions, one per row: prompts of different lengths prefilled
        together, right-padded, each row's logits taken at its own last token."""
        if (isinstance(last_only, torch.Tensor) or last_only) and targets is not None:
            raise ValueError("last_only=True returns logits; it cannot be combined with targets")
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.get_pos()  # an int, or (B,) positions of rows at their own lengths
        row_mask = getattr(kv_cache, "row_mask", None)  # with (B,) positions: (B, 1, T, end) keys each query sees
        end = row_mask.size(-1) if isinstance(T0, torch.Tensor) else T0 + T  # a size, not a tensor's value: compiles
        if end > self.cos.size(1):  # only reachable in long generations, never in training
            self.cos, self.sin = self._rotary_tables(2 * end, device=idx.device)
        if isinstance(T0, torch.Tensor):
            positions = T0[:, None] + torch.arange(T, device=T0.device)  # (B, T)
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)
        else:
            cos, sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = x0 = norm(self.transformer.wte(idx))
        windows = self.config.layer_windows()
        masks = {}
        if any(windows):  # which keys each query sees, one mask per window length; the key count is a plain int
            qpos = positions if isinstance(T0, torch.Tensor) else torch.arange(T0, T0 + T, device=idx.device)[None]
            Tk = row_mask.size(-1) if row_mask is not None else T0 + T
            masks = {w: self._window_mask(w, qpos, Tk, row_mask) for w in set(windows) - {None}}
        for i, block in enumerate(self.transformer.h):
            if self.config.residual_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if self.config.has_value_embed(i) else None
            x = block(x, cos, sin, kv_cache, ve, masks.get(windows[i]))
        if isinstance(last_only, torch.Tensor):
            x = x[torch.arange(B, device=x.device), last_only].unsqueeze(1)
        elif last_only:
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
            return SoftcapCrossEntropy.apply(self._head(x).flatten(0, 1), targets, cap).view(B, T)
        # training: the head's matmul happens inside, by chunks (lm_head's forward hooks do not run)
        head = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        loss = ChunkedHeadLoss.apply(x.reshape(-1, x.size(-1)), head, targets, cap, torch.is_grad_enabled())
        return loss / (targets != -1).sum() if loss_reduction == "mean" else loss


# -----------------------------------------------------------------------------
# python -m nanochat.gpt --depth=20 --tie-embeddings ...: print the parameter breakdown (meta device)

if __name__ == "__main__":
    from nanochat.common import make_parser, positive_int
    from nanochat.recipe import add_model_flags, config_from_flags
    parser = make_parser("Print the GPT parameter breakdown for the architecture flags (built on the meta device).")
    parser.add_argument("--vocab-size", type=positive_int, default=65536, help="tokenizer vocabulary")
    add_model_flags(parser.add_argument_group("model (the flags of scripts.base_train)"))
    args = parser.parse_args()
    try:
        cfg = config_from_flags(args, args.vocab_size)
    except ValueError as e:
        parser.error(str(e))
    print(cfg)
    with torch.device("meta"):
        model = GPT(cfg)
    g = model.num_params_by_group()
    print("| group | parameters | share |\n| --- | ---: | ---: |")
    for name in g:
        print(f"| {name} | {g[name]:,} | {100 * g[name] / g['total']:.1f}% |")
    print(f"\ntraining FLOPs per token: {model.estimate_flops():.4g}")
