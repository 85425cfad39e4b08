import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nanochat import checkpoint as ck
from nanochat.chat_data import conversation_loss
from nanochat.loss_eval import evaluate_bpb


def _state():
    return {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(2)}


def test_save_load_roundtrip(tmp_path):
    d = str(tmp_path / "tag")
    optim = {"state": {0: {"exp_avg": torch.randn(3)}}, "param_groups": [{"lr": 0.1}]}
    rng = {"cpu": torch.get_rng_state()}
    ck.save_checkpoint(d, 7, _state(), optim, {"model_config": {"n_layer": 1}, "loader": {"pos": 3}}, rng_state=rng)
    ck.save_checkpoint(d, 12, _state(), optim, {"model_config": {"n_layer": 1}})
    assert ck.list_complete_steps(d) == [7, 12] and ck.find_last_step(d) == 12
    model_state, payload, meta = ck.load_checkpoint(d, 7, "cpu", load_optimizer=True, verify_hash=True)
    assert torch.equal(model_state["w"], _state()["w"])
    assert torch.equal(payload["optimizer"]["state"][0]["exp_avg"], optim["state"][0]["exp_avg"])
    assert torch.equal(payload["rng"]["cpu"], rng["cpu"])
    assert meta["loader"] == {"pos": 3} and meta["step"] == 7


def test_partial_checkpoint_is_never_complete(tmp_path):
    d = str(tmp_path / "tag")
    ck.save_checkpoint(d, 1, _state(), None, {})
    # a save killed before meta.json: only the .partial dir exists
    os.makedirs(os.path.join(d, "step_000002.partial"))
    torch.save(_state(), os.path.join(d, "step_000002.partial", "model.pt"))
    # a step dir whose meta.json never got written
    os.makedirs(os.path.join(d, "step_000003"))
    assert ck.find_last_step(d) == 1
    with pytest.raises(ck.CheckpointError, match="meta.json is missing"):
        ck.load_checkpoint(d, 3, "cpu")


def test_truncated_and_corrupt_files_are_named(tmp_path):
    d = str(tmp_path / "tag")
    path = ck.save_checkpoint(d, 5, _state(), {"x": torch.zeros(3)}, {})
    model_pt = os.path.join(path, "model.pt")
    data = open(model_pt, "rb").read()
    open(model_pt, "wb").write(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="model.pt is truncated"):
        ck.load_checkpoint(d, 5, "cpu")
    open(os.path.join(path, "meta.json"), "w").write("{not json")
    with pytest.raises(ck.CheckpointError, match="meta.json is corrupt"):
        ck.load_checkpoint(d, 5, "cpu")
    with pytest.raises(ck.CheckpointError, match="no checkpoint at"):
        ck.load_checkpoint(d, 99, "cpu")


def test_missing_optimizer_rank_is_named(tmp_path):
    d = str(tmp_path / "tag")
    ck.save_checkpoint(d, 1, _state(), {"x": torch.zeros(1)}, {})
    with pytest.raises(ck.CheckpointError, match="no optimizer state for rank 1"):
        ck.load_checkpoint(d, 1, "cpu", load_optimizer=True, rank=1)


def test_largest_model_and_missing_source(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(ck.CheckpointError, match="scripts.mid_train"):
        ck.resolve_checkpoint("mid")
    root = ck.checkpoints_root("base")
    for tag in ("d4", "d12", "d8"):
        ck.save_checkpoint(os.path.join(root, tag), 3, _state(), None, {})
    assert ck.resolve_checkpoint("base") == (os.path.join(root, "d12"), 3)
    with pytest.raises(ValueError):
        ck.checkpoints_root("pretrain")


class _ToyLM(torch.nn.Module):
    """Uniform predictions over V tokens: loss is ln V for every target (`peak` adds that logit to token 1,
    so losses differ by target)."""
    def __init__(self, vocab, peak=0.0):
        super().__init__()
        self.vocab, self.peak = vocab, peak
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def get_device(self):
        return self.dummy.device

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*x.shape, self.vocab)
        logits[..., 1] = self.peak
        return torch.nn.functional.cross_entropy(logits.view(-1, self.vocab), y.view(-1), ignore_index=-1,
                                                 reduction=loss_reduction)


def test_bits_per_byte_by_hand():
    vocab = 8
    token_bytes = torch.tensor([0, 1, 2, 3, 1, 1, 1, 1])  # id 0 is a special token
    x = torch.zeros(1, 4, dtype=torch.long)
    y = torch.tensor([[2, 3, 0, -1]])  # 2+3 bytes counted; the special and the ignored target are not
    batches = iter([(x, y)] * 2)
    bpb = evaluate_bpb(_ToyLM(vocab), batches, 2, token_bytes)
    expected = (2 * 2 * math.log(vocab)) / (math.log(2) * 2 * 5)
    assert bpb == pytest.approx(expected)
    with pytest.raises(ValueError, match="no text bytes"):
        evaluate_bpb(_ToyLM(vocab), iter([(x, torch.tensor([[0, 0, -1, -1]]))]), 1, token_bytes)


class _ListTokenizer:
    """A conversation is already {"ids": [...], "mask": [...]}: render_conversation only truncates."""
    def render_conversation(self, conversation, max_tokens):
        return conversation["ids"][:max_tokens], conversation["mask"][:max_tokens]

    def get_bos_token_id(self):
        return 0


# (inputs, targets) batches and conversations whose losses differ from rank to rank
BYTES = [0, 1, 2, 3, 1, 1, 1, 1]
BATCHES = [(torch.zeros(1, 4, dtype=torch.long), torch.tensor([[2, 3, 0, -1]])),
           (torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 1, 4, 4]]))]
CONVERSATIONS = [{"ids": [0, 5, 1, 1, 2], "mask": [0, 0, 1, 1, 1]}, {"ids": [0, 3, 3], "mask": [0, 1, 1]},
                 {"ids": [0, 1, 2, 1], "mask": [0, 0, 0, 1]}]

DIST_EVAL = """\
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_checkpoint import BATCHES, BYTES, CONVERSATIONS, _ListTokenizer, _ToyLM
from nanochat.chat_data import conversation_loss
from nanochat.common import compute_cleanup, compute_init
from nanochat.loss_eval import evaluate_bpb
_, rank, _, world, _ = compute_init("cpu")
model = _ToyLM(8, peak=2.0)
bpb = evaluate_bpb(model, iter(BATCHES[rank::world]), 1, torch.tensor(BYTES))
loss = conversation_loss(model, _ListTokenizer(), CONVERSATIONS, batch_size=1, max_len=16)
open({out!r} + "/rank%d.json" % rank, "w").write(json.dumps([bpb, loss]))
compute_cleanup()
"""


def test_held_out_sums_over_two_gloo_ranks(tmp_path):
    """bits per byte and the conversation loss under torchrun: each rank evaluates its share and the sums
    are added over ranks, so every rank reports what one process gets over all the data."""
    model = _ToyLM(8, peak=2.0)
    expected = [evaluate_bpb(model, iter(BATCHES), 2, torch.tensor(BYTES)),
                conversation_loss(model, _ListTokenizer(), CONVERSATIONS, batch_size=1, max_len=16)]
    alone = [evaluate_bpb(model, iter(BATCHES[:1]), 1, torch.tensor(BYTES)),
             conversation_loss(model, _ListTokenizer(), CONVERSATIONS[::2], batch_size=1, max_len=16)]
    assert all(a != pytest.approx(e) for a, e in zip(alone, expected)), "rank 0's share alone must differ"
    script = tmp_path / "w.py"
    script.write_text(DIST_EVAL.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path)))
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    for r in (0, 1):
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == pytest.approx(expected, rel=1e-12)
