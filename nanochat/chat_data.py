"""
Conversations -> training batches for the chat stages, and the held-out conversation loss.

- ConversationStream: the training conversations of one data-parallel slot, epoch after epoch. Slot s of S
  (S = ranks x accumulation steps) takes rows s, s+S, s+2S, ... of each epoch's shuffled order, so a run
  on 2 ranks and a run on 1 rank with 2 accumulation steps see the same batches.
- PackedLoader (midtraining): rendered conversations, each starting with <|bos|>, laid end to end and cut
  into full rows like pretraining text: a batch is the next B*T+1 tokens (inputs the first B*T, targets the
  last B*T), so conversations span rows and no token is padding. Loss on every token, or with
  mask_loss=True only on the tokens the assistant must learn (the render mask).
- PaddedLoader (SFT): one conversation per row, truncated to T+1 tokens, the batch padded to its longest
  row; targets are -1 (ignored) on padding and wherever the render mask is 0 (user turns, tool outputs).

Both loaders resume exactly from state_dict(): the stream position plus, for packing, the rendered tokens
not yet consumed.
"""
import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import all_reduce_sum, dist_rank_world

MAX_RENDER_TOKENS = 1 << 20  # packing keeps whole conversations; this only guards against absurd rows


class ConversationStream:
    """Iterator of conversations: slot `slot` of `num_slots` of every epoch of `mixture` (tasks.mixtures)."""

    def __init__(self, mixture, slot=0, num_slots=1, seed=0):
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot must be in [0, {num_slots}), got {slot}")
        if len(mixture) < num_slots:
            raise ValueError(f"the mixture has {len(mixture)} training rows per epoch, fewer than the {num_slots} "
                             "data-parallel slots (ranks x accumulation steps) that share it")
        self.mixture, self.slot, self.num_slots, self.seed = mixture, slot, num_slots, seed
        self.epoch, self.cursor = 0, 0
        self._rows, self._rows_epoch = None, None

    def rows(self, epoch):
        """This slot's row references in epoch `epoch`."""
        if self._rows_epoch != epoch:
            self._rows = self.mixture.epoch_rows(epoch, self.seed)[self.slot::self.num_slots]
            self._rows_epoch = epoch
        return self._rows

    def rows_per_epoch(self):
        """The fewest rows any slot gets per epoch (every slot must take the same number of steps)."""
        return len(self.mixture) // self.num_slots

    def __iter__(self):
        return self

    def __next__(self):
        if self.cursor >= self.rows_per_epoch():
            self.epoch, self.cursor = self.epoch + 1, 0
        ref = self.rows(self.epoch)[self.cursor]
        self.cursor += 1
        return self.mixture.get(ref)

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor, "slot": self.slot, "num_slots": self.num_slots,
                "rows_per_epoch": len(self.mixture)}

    def load_state_dict(self, state):
        if (state["slot"], state["num_slots"]) != (self.slot, self.num_slots):
            raise ValueError(f"loader state is for slot {state['slot']} of {state['num_slots']}, this loader is "
                             f"slot {self.slot} of {self.num_slots}")
        if state["rows_per_epoch"] != len(self.mixture):
            raise ValueError(f"the mixture changed since the checkpoint: {len(self.mixture)} rows per epoch now, "
                             f"{state['rows_per_epoch']} then (same --mixture, --extra-data and data files needed)")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


class PackedLoader:
    """(inputs, targets), both (B, T) int64 on `device`, of packed conversations (midtraining)."""

    def __init__(self, tokenizer, stream, B, T, device="cpu", mask_loss=False):
        self.tokenizer, self.stream, self.B, self.T = tokenizer, stream, B, T
        self.device = torch.device(device)
        self.mask_loss = mask_loss
        self.ids, self.mask = [], []  # rendered, not yet consumed

    def __iter__(self):
        return self

    def __next__(self):
        need = self.B * self.T + 1
        while len(self.ids) < need:
            ids, mask = self.tokenizer.render_conversation(next(self.stream), max_tokens=MAX_RENDER_TOKENS)
            self.ids += ids
            self.mask += mask
        chunk = torch.tensor(self.ids[:need], dtype=torch.long)
        x = chunk[:-1].view(self.B, self.T)
        y = chunk[1:].clone()
        if self.mask_loss:
            y[torch.tensor(self.mask[1:need], dtype=torch.bool).logical_not()] = -1
        del self.ids[:need - 1], self.mask[:need - 1]  # the last token starts the next batch
        return x.to(self.device), y.view(self.B, self.T).to(self.device)

    def state_dict(self):
        return {"stream": self.stream.state_dict(), "ids": list(self.ids), "mask": list(self.mask)}

    def load_state_dict(self, state):
        self.stream.load_state_dict(state["stream"])
        self.ids, self.mask = list(state["ids"]), list(state["mask"])


def pad_conversations(rendered, pad_id, max_len=None):
    """[(ids, mask)] -> (inputs, targets) (B, L) int64 on CPU: L is the longest row minus one (at most
    max_len); targets are -1 on padding and where the mask of the target token is 0."""
    if max_len is not None:
        rendered = [(ids[:max_len + 1], mask[:max_len + 1]) for ids, mask in rendered]
    rows = [(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool)) for ids, mask in rendered]
    x = pad_sequence([ids[:-1] for ids, _ in rows], batch_first=True, padding_value=pad_id)
    y = pad_sequence([ids[1:].where(mask[1:], -1) for ids, mask in rows], batch_first=True, padding_value=-1)
    return x, y


class PaddedLoader:
    """(inputs, targets) (B, L <= T) int64 on `device`, one conversation per row (SFT)."""

    def __init__(self, tokenizer, stream, B, T, device="cpu"):
        self.tokenizer, self.stream, self.B, self.T = tokenizer, stream, B, T
        self.device = torch.device(device)
        self.pad_id = tokenizer.get_bos_token_id()  # any id: padded positions are never targets

    def __iter__(self):
        return self

    def __next__(self):
        rendered = [self.tokenizer.render_conversation(next(self.stream), max_tokens=self.T + 1) for _ in range(self.B)]
        x, y = pad_conversations(rendered, self.pad_id)
        return x.to(self.device), y.to(self.device)

    def state_dict(self):
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state):
        self.stream.load_state_dict(state["stream"])


def estimate_epoch_tokens(tokenizer, mixture, seed=0, sample=500):
    """Rendered tokens in one epoch of the mixture, estimated from the first `sample` rows of epoch 0 (the
    same rows on every rank, so every rank gets the same number)."""
    rows = mixture.epoch_rows(0, seed)[:sample]
    lengths = [len(tokenizer.render_conversation(mixture.get(r), max_tokens=MAX_RENDER_TOKENS)[0]) for r in rows]
    return round(sum(lengths) / len(lengths) * len(mixture))


@torch.no_grad()
def conversation_loss(model, tokenizer, conversations, batch_size=8, max_len=None, device=None):
    """Mean cross-entropy (nats per token) over the assistant tokens (render mask 1) of `conversations`,
    one per row, truncated to max_len+1 tokens (default the model's context). The same number whatever
    the stage trained with, so held-out loss compares across midtraining, SFT and RL. Under torchrun each
    rank takes conversations rank::world_size and the sums are all-reduced (a collective)."""
    device = device if device is not None else model.get_device()
    max_len = max_len or model.config.sequence_len
    rank, world = dist_rank_world()
    mine = conversations[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # nats, tokens
    for i in range(0, len(mine), batch_size):
        rendered = [tokenizer.render_conversation(c, max_tokens=max_len + 1) for c in mine[i:i + batch_size]]
        x, y = pad_conversations(rendered, tokenizer.get_bos_token_id())
        x, y = x.to(device), y.to(device)
        total[0] += model(x, y, loss_reduction="sum").double()
        total[1] += (y != -1).sum()
    total = all_reduce_sum(total)
    if total[1].item() == 0:
        raise ValueError("held-out conversations have no assistant tokens within the context length")
    return (total[0] / total[1]).item()
