"""
Bits per byte: a tokenizer-independent validation loss, so models with different vocabularies
compare fairly. Summed cross-entropy (nats) over target tokens / ln 2 / summed UTF-8 bytes of
those targets. Special tokens (0 bytes) and ignored targets (-1) count in neither sum.
"""
import math

import torch

from nanochat.common import all_reduce_sum


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """`batches` yields (inputs, targets); `token_bytes[id]` is the byte length of token id. Under torchrun
    every rank evaluates its own batches and the sums are added over ranks (a collective)."""
    device = model.get_device()
    token_bytes = token_bytes.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in range(steps):
        x, y = next(batches)
        losses = model(x, y, loss_reduction="none").reshape(-1).double()
        y = y.reshape(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[torch.where(valid, y, 0)], 0)
        total_nats += torch.where(nbytes > 0, losses, 0.0).sum()
        total_bytes += nbytes.sum()
    total_nats, total_bytes = all_reduce_sum(torch.stack([total_nats, total_bytes.double()]))  # bytes exact below 2^53
    if total_bytes.item() == 0:
        raise ValueError("bits per byte is undefined: the evaluated targets hold no text bytes")
    return (total_nats / (math.log(2) * total_bytes)).item()
