"""
The GPT model. Reference design by default, each of the first user's planned changes as a config value:
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

The architecture flags and the first user's planned changes are declared here, beside GPTConfig; the
hand-written autograd functions of the hot paths are in nanochat/kernels.py.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import (dist_rank_world, make_parser, non_negative_float, non_negative_int, positive_float,
                             positive_int, str2bool)
from nanochat.kernels import ChunkedHeadLoss, SoftcapCrossEntropy, causal_attention

ACTIVATIONS = ("relu2", "gelu", "silu")


MAX_SEQUENCE_LEN = 1 << 20


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
        if self.sequence_len > MAX_SEQUENCE_LEN:  # the rotary tables hold 10x this many positions
            raise ValueError(f"GPTConfig.sequence_len must be at most {MAX_SEQUENCE_LEN}, got {self.sequence_len}")
        for name in ("mlp_ratio", "rope_base"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"GPTConfig.{name} must be a positive finite number, got {value!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"GPTConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
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
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    allowed = {f.name for f in fields(GPTConfig)} - {"n_layer", "n_embd", "n_head", "vocab_size", "sequence_len"}
    unknown = set(knobs) - allowed
    if unknown:
        raise ValueError(f"config_for_depth: unknown config field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    n_embd = 64 * depth
    n_head = largest_divisor(n_embd, n_embd // head_dim)
    knobs.setdefault("n_kv_head", n_head)
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_embd=n_embd, **knobs).validate()


# -----------------------------------------------------------------------------
# The architecture flags, declared once: scripts.base_train, scripts.plan, scripts.ablate, bench/ and this
# module's __main__ all take them from here. A new knob = its GPTConfig field, its use in the model, one
# flag line in add_model_flags (dest = the field's name: config_from_flags passes it through), and its
# row in docs/model.md.

# Flags config_from_flags reads itself (the sizing rule); every other flag is the GPTConfig field of its name.
SIZING_FLAGS = ("depth", "head_dim", "max_seq_len", "n_kv_head", "kv_head_ratio")


def add_model_flags(parser, with_depth=True, **defaults):
    """Add the architecture flags to `parser`: a nanochat.common.make_parser parser or one of its argument
    groups (so --tie-embeddings also takes the bare and --no- forms). with_depth=False leaves --depth out
    (scripts.plan sweeps --depths instead); `defaults`, by dest, replaces flag defaults (scripts.ablate's
    tiny scale). Bad values are argparse errors that name the flag. Returns the dests added, in order."""
    dests = []

    def add(flag, default, **kw):
        dest = flag[2:].replace("-", "_")
        parser.add_argument(flag, default=defaults.pop(dest, default), **kw)
        dests.append(dest)

    if with_depth:
        add("--depth", 20, type=positive_int, help="number of layers; width is 64 x depth")
    add("--head-dim", 128, type=positive_int, help="channels per attention head")
    add("--max-seq-len", 2048, type=positive_int, help="context length")
    add("--mlp-ratio", 4.0, type=positive_float, help="MLP hidden size / width")
    add("--activation", "relu2", choices=ACTIVATIONS)
    add("--tie-embeddings", False, type=str2bool, help="share wte and lm_head")
    add("--n-kv-head", 0, type=non_negative_int, help="key/value heads (0 = n_head / --kv-head-ratio)")
    add("--kv-head-ratio", 1, type=positive_int, help="n_kv_head = n_head // ratio, rounded down to a divisor of n_head")
    add("--softcap", 15.0, type=non_negative_float, help="logit softcap (0 = off)")
    add("--rope-base", 10000.0, type=positive_float, help="rotary embedding base (theta)")
    if defaults:
        raise ValueError(f"add_model_flags: no architecture flag for default(s) {sorted(defaults)}")
    return dests


def model_flags(**values):
    """The architecture flags as a namespace: their defaults, with `values` (by dest) in place. For
    callers that name a shape their own way (bench/train_step.py's --seq_len) and still build the
    config through config_from_flags, like the scripts."""
    parser = make_parser(None)
    add_model_flags(parser, **values)
    return parser.parse_args([])


MODEL_FLAGS = tuple(vars(model_flags()))  # every architecture flag's dest, in declaration order


def config_from_flags(args, vocab_size):
    """The GPTConfig the architecture flags in `args` describe, for a tokenizer of `vocab_size` tokens:
    config_for_depth's sizing at --depth and --head-dim, context --max-seq-len; n_kv_head = --n-kv-head,
    or when that is 0, n_head // --kv-head-ratio rounded down to a divisor of n_head (GQA needs whole
    groups: at depth 28, 14 heads // 4 = 3 rounds to 2). Every other flag is the GPTConfig field of its
    name; --softcap 0 is stored as None (off). Raises ValueError naming the field when the flags give
    no valid model."""
    knobs = {name: getattr(args, name) for name in MODEL_FLAGS if name not in SIZING_FLAGS}
    knobs["softcap"] = knobs["softcap"] or None
    n_head = config_for_depth(args.depth, vocab_size, head_dim=args.head_dim).n_head
    n_kv_head = args.n_kv_head or largest_divisor(n_head, n_head // args.kv_head_ratio)
    return config_for_depth(args.depth, vocab_size, sequence_len=args.max_seq_len, head_dim=args.head_dim,
                            n_kv_head=n_kv_head, **knobs)


# The first user's planned architecture changes, each one alone, as architecture-flag values over
# the reference: (label, flag values, part of "all together"). A context change is a divisor of the
# reference context, so one list serves the full-size planner (2048 -> 1024, 512) and the tiny
# ablation (256 -> 128, 64). scripts.plan prices them, scripts.ablate trains them (planned_changes).
PLANNED_CHANGES = (
    ("tied embeddings", dict(tie_embeddings=True), True),
    ("context / 2", dict(context_divisor=2), True),
    ("context / 4", dict(context_divisor=4), False),
    ("MLP 3x", dict(mlp_ratio=3.0), True),
    ("MLP 2.5x", dict(mlp_ratio=2.5), False),
    ("n_kv_head = n_head // 4", dict(n_kv_head=0, kv_head_ratio=4), True),
    ("GELU", dict(activation="gelu"), False),
    ("SiLU", dict(activation="silu"), True),
    ("softcap off", dict(softcap=0.0), True),
    ("RoPE base 100000", dict(rope_base=100000.0), True),
)


def planned_changes(max_seq_len, context_label="context"):
    """[(label, flag values)]: each planned change alone, then "all together" (the changes marked for it,
    merged in order). Context changes are resolved against the reference context `max_seq_len` and
    labelled f"{context_label} {length}" (the planner says "seq 1024", the ablation "context 128")."""
    rows, together = [], {}
    for label, change, in_plan in PLANNED_CHANGES:
        change = dict(change)
        divisor = change.pop("context_divisor", None)
        if divisor:
            change["max_seq_len"] = max_seq_len // divisor
            label = f"{context_label} {change['max_seq_len']}"
        rows.append((label, change))
        if in_plan:
            together.update(change)
    return rows + [("all together", together)]


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
        row_mask = None
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache kept in another dtype
            row_mask = kv_cache.row_mask  # rows at different lengths (continuous batching): which keys each row sees
        Tk = k.size(2)
        gqa = self.n_kv_head != self.n_head
        if row_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=row_mask, enable_gqa=gqa)
        elif Tk == T:  # training, or a prefill into an empty cache: plain causal
            y = causal_attention(q, k, v)
        elif T == 1:  # decode: the one new query sees every cached position
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # chunk after cached tokens: sees the whole prefix, causal inside the chunk
            mask = torch.ones(T, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - T)
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
        self.cos, self.sin = self._rotary_tables(self.cos.size(1), device=wte.device)

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
        scale = (self.config.n_embd / 768) ** -0.5
        matrix_params = list(self.transformer.h.parameters())
        wte = self.transformer.wte.weight
        if self.config.tie_embeddings:
            adam_groups = [dict(params=[wte], lr=unembedding_lr * scale)]
        else:
            adam_groups = [dict(params=[self.lm_head.weight], lr=unembedding_lr * scale),
                           dict(params=[wte], lr=embedding_lr * scale)]
        assert len(matrix_params) + sum(len(g["params"]) for g in adam_groups) == len(list(self.parameters()))
        adam_cls, muon_cls = (DistAdamW, DistMuon) if dist_rank_world()[1] > 1 else (AdamW, Muon)
        adamw = adam_cls(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay)
        muon = muon_cls(matrix_params, lr=matrix_lr, momentum=0.95)
        for group in adamw.param_groups + muon.param_groups:
            group["initial_lr"] = group["lr"]
        return [adamw, muon]

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
        T0 = 0 if kv_cache is None else kv_cache.get_pos()  # an int, or (B,) positions of rows at their own lengths
        end = (int(T0.max()) if isinstance(T0, torch.Tensor) else T0) + T
        if end > self.cos.size(1):  # only reachable in long generations, never in training
            self.cos, self.sin = self._rotary_tables(2 * end, device=idx.device)
        if isinstance(T0, torch.Tensor):
            positions = T0[:, None] + torch.arange(T, device=T0.device)  # (B, T)
            cos, sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)
        else:
            cos, sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.transformer.wte(idx))
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
            return SoftcapCrossEntropy.apply(logits.view(-1, logits.size(-1)), targets, cap).view(B, T)
        # training: the head's matmul happens inside, by chunks (lm_head's forward hooks do not run)
        head = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        loss = ChunkedHeadLoss.apply(x.reshape(-1, x.size(-1)), head, targets, cap, torch.is_grad_enabled())
        return loss / (targets != -1).sum() if loss_reduction == "mean" else loss


# -----------------------------------------------------------------------------
# python -m nanochat.gpt --depth=20 --tie-embeddings ...: print the parameter breakdown (meta device)

if __name__ == "__main__":
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
