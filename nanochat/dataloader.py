"""
The distributed tokenizing loader: documents of the mixture -> BOS-prefixed tokens -> packed (B, T) batches.

- Rank r of W takes documents r, r+W, r+2W, ... of the global document stream (nanochat.dataset), so
  ranks read disjoint documents and together every one. (Every rank reads the whole stream to know
  the mixture's order; reading is cheap next to tokenizing, which each rank does only for its own.)
- Its documents are tokenized in batches on the tokenizer's threads, BOS before each, and laid end
  to end in one token stream. A batch is the next B*T+1 tokens: inputs are the first B*T, targets
  the last B*T. So row b covers tokens [b*T, b*T+T] of the batch, documents span rows and batches,
  and every token is a target exactly once.
- Exact resume: the state is the mixture position before the first document that still has
  unconsumed tokens, plus how many of its tokens (and its tokenizer batch's) were already consumed.
  Restoring re-reads and re-tokenizes from there. It is a few hundred bytes of JSON.
"""
import itertools

import numpy as np
import torch

from nanochat.common import get_dist_info
from nanochat.dataset import DataError, DocumentMixture

MAX_BATCH_CHARS = 4_000_000  # cap on the text of one tokenizer batch: whole books are ~1 MB each


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"DataLoader: {name} must be a positive int, got {value!r}")


class DataLoader:
    """Iterator of (inputs, targets), both (B, T) int64 tensors on `device`.
    split="val" ignores `seed`, so every run is evaluated on the same batches."""

    def __init__(self, tokenizer, B, T, spec=None, split="train", device="cpu", seed=0, tokenizer_threads=4,
                 tokenizer_batch_size=128, infinite=True, rank=None, world_size=None, on_bad_line="skip"):
        for name, value in (("B", B), ("T", T), ("tokenizer_threads", tokenizer_threads),
                            ("tokenizer_batch_size", tokenizer_batch_size)):
            _check_positive(name, value)
        _, dist_rank, _, dist_world = get_dist_info()
        rank = dist_rank if rank is None else rank
        world_size = dist_world if world_size is None else world_size
        _check_positive("world_size", world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"DataLoader: rank must be in [0, {world_size}), got {rank!r}")
        self.tokenizer = tokenizer
        self.B, self.T = B, T
        self.split = split
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.threads = tokenizer_threads
        self.batch_docs = tokenizer_batch_size
        self.bos = tokenizer.get_bos_token_id()
        self.docs = DocumentMixture(spec, split=split, seed=0 if split == "val" else seed,
                                    infinite=infinite, on_bad_line=on_bad_line)
        # Tokenized, unconsumed text: chunks of (mixture state before the chunk's first document, tokens).
        # `pos` tokens of the first chunk are consumed already.
        self.chunks = []
        self.pos = 0

    def __iter__(self):
        return self

    # -- reading and tokenizing

    def _tokenize_more(self):
        """Append one tokenizer batch of this rank's documents to the buffer; False when there is nothing
        left to read."""
        state = self.docs.state_dict()
        texts, chars = [], 0
        for index, text in enumerate(self.docs, start=self.docs.index):  # index: the document's place in the stream
            if index % self.world_size != self.rank:
                continue
            texts.append(text)
            chars += len(text)
            if len(texts) == self.batch_docs or chars >= MAX_BATCH_CHARS:
                break
        if not texts:
            return False
        rows = self.tokenizer.encode(texts, prepend=self.bos, num_threads=self.threads)
        tokens = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=sum(map(len, rows)))
        self.chunks.append((state, tokens))
        return True

    def _available(self):
        return sum(len(t) for _, t in self.chunks) - self.pos

    def _fill(self, n):
        while self._available() < n:
            if not self._tokenize_more():
                return False
        return True

    def _advance(self, n):
        """Mark n tokens consumed, dropping chunks that are used up."""
        self.pos += n
        while self.chunks and self.pos >= len(self.chunks[0][1]):
            self.pos -= len(self.chunks[0][1])
            self.chunks.pop(0)

    # -- batches

    def __next__(self):
        n = self.B * self.T
        if not self._fill(n + 1):
            raise StopIteration
        pieces, start, need = [], self.pos, n + 1
        for _, tokens in self.chunks:
            piece = tokens[start:start + need]
            pieces.append(piece)
            need -= len(piece)
            start = 0
            if need == 0:
                break
        buf = torch.from_numpy(np.concatenate(pieces))
        self._advance(n)  # the last token stays: it is the first input of the next batch
        if self.pin:
            buf = buf.pin_memory()
        inputs = buf[:-1].view(self.B, self.T).to(self.device, non_blocking=self.pin)
        targets = buf[1:].view(self.B, self.T).to(self.device, non_blocking=self.pin)
        return inputs, targets

    # -- exact resume

    def state_dict(self):
        """This rank's position, JSON-serialisable. A multi-rank run saves one per rank."""
        docs = self.chunks[0][0] if self.chunks else self.docs.state_dict()
        return {"version": 1, "rank": self.rank, "world_size": self.world_size, "split": self.split,
                "vocab_size": self.tokenizer.get_vocab_size(), "docs": docs, "skip_tokens": self.pos}

    def load_state_dict(self, state):
        """Accepts this rank's state, or the list of every rank's states (picks its own)."""
        if isinstance(state, (list, tuple)):
            if len(state) != self.world_size:
                raise DataError(f"loader states for {len(state)} ranks, but this run has {self.world_size}")
            state = state[self.rank]
        if state.get("version") != 1:
            raise DataError(f"unknown loader state version {state.get('version')!r}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise DataError(f"loader state was saved by rank {state['rank']} of {state['world_size']}; this loader is "
                            f"rank {self.rank} of {self.world_size}: exact resume needs the same ranks")
        if state["vocab_size"] != self.tokenizer.get_vocab_size():
            raise DataError(f"loader state was saved with a tokenizer of {state['vocab_size']} tokens, this one has "
                            f"{self.tokenizer.get_vocab_size()}")
        self.docs.load_state_dict(state["docs"])
        self.chunks, self.pos = [], 0
        skip = state["skip_tokens"]
        if skip:
            self._fill(skip + 1)
            self._advance(min(skip, self._available()))


def build_val_loader(tokenizer, B, T, **kwargs):
    """Batches of the validation split, the same for every run (DataLoader's keyword arguments). It cycles
    (with a warning when the split is smaller than what is asked), so every rank can take the same fixed
    number of steps. Build a fresh one per evaluation."""
    return DataLoader(tokenizer, B, T, split="val", infinite=True, **kwargs)
