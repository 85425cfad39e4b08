"""
Run by tests/test_dataloader.py under `python -m torch.distributed.run --nproc_per_node=2` (gloo).
Each rank reads one pass of the data through the DataLoader and writes the documents it tokenized
and its batches' shapes to OUT/rank{r}.json; the test checks they are disjoint and cover everything.
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from nanochat.common import compute_cleanup, compute_init
from nanochat.dataloader import DataLoader


class RecordingByteTokenizer:
    """One token per UTF-8 byte, BOS = 256; remembers every document it was asked to encode."""

    def __init__(self):
        self.seen = []

    def get_bos_token_id(self):
        return 256

    def get_vocab_size(self):
        return 257

    def encode(self, texts, prepend=None, num_threads=1):
        self.seen.extend(texts)
        return [[prepend] + list(t.encode("utf-8")) for t in texts]


def main():
    spec, out = sys.argv[1], sys.argv[2]
    is_ddp, rank, _, world_size, device = compute_init("cpu")
    assert is_ddp and world_size == 2 and dist.get_backend() == "gloo"
    tok = RecordingByteTokenizer()
    loader = DataLoader(tok, 2, 16, spec=spec, device=device, infinite=False, tokenizer_batch_size=3)
    batches = 0
    for x, y in loader:
        assert x.shape == y.shape == (2, 16) and x.dtype == torch.long
        batches += 1
    # The ranks agree on nothing but the stream; gather the document counts to check the process group works.
    counts = [None] * world_size
    dist.all_gather_object(counts, len(tok.seen))
    with open(os.path.join(out, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"rank": rank, "docs": tok.seen, "batches": batches, "counts": counts}, f)
    compute_cleanup()


if __name__ == "__main__":
    main()
