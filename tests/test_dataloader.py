"""The tokenizing loader: packing, BOS, disjoint ranks (also under torchrun), exact resume, validation."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT, require_shared_data
from nanochat.dataloader import DataLoader, build_val_loader
from nanochat.dataset import DataError, iter_documents
from test_dataset import make_source

BOS = 256


class ByteTokenizer:
    """Stand-in with the tokenizer's interface: one token per UTF-8 byte, BOS = 256."""

    def get_bos_token_id(self):
        return BOS

    def get_vocab_size(self):
        return 257

    def encode(self, texts, prepend=None, num_threads=1):
        return [[prepend] + list(t.encode("utf-8")) for t in texts]


@pytest.fixture(scope="module")
def real_tokenizer(tokenizer):
    """The project tokenizer (conftest's session one, a real BPE) where ByteTokenizer would not do."""
    return tokenizer


@pytest.fixture
def spec(tmp_path):
    a, _ = make_source(tmp_path, "alpha", 60, 40, n_files=3, val_docs=6)
    b, _ = make_source(tmp_path, "beta", 9, 300, val_docs=2)
    return f"{a}:0.6,{b}:0.4"


def stream_tokens(spec, split="train", seed=0, rank=0, world_size=1):
    """What the loader must produce: the rank's documents of the stream, BOS-prefixed, end to end."""
    out = []
    for i, text in enumerate(iter_documents(spec, split=split, seed=seed, infinite=False)):
        if i % world_size == rank:
            out += [BOS] + list(text.encode("utf-8"))
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_the_packed_token_stream(spec):
    B, T = 3, 32
    loader = DataLoader(ByteTokenizer(), B, T, spec=spec, tokenizer_batch_size=4, infinite=False)
    expected = stream_tokens(spec)
    batches = list(loader)
    assert len(batches) == (len(expected) - 1) // (B * T)  # the last partial batch is dropped
    for k, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long and x.device.type == "cpu"
        window = torch.tensor(expected[k * B * T: (k + 1) * B * T + 1])
        assert torch.equal(x.reshape(-1), window[:-1]) and torch.equal(y.reshape(-1), window[1:])


def test_ranks_read_disjoint_documents_covering_everything(spec):
    everything = stream_tokens(spec)
    parts = [stream_tokens(spec, rank=r, world_size=3) for r in range(3)]
    assert sum(len(p) for p in parts) == len(everything)
    for r in range(3):
        loader = DataLoader(ByteTokenizer(), 2, 16, spec=spec, rank=r, world_size=3, infinite=False)
        got = torch.cat([x.reshape(-1) for x, _ in loader])
        assert torch.equal(got, torch.tensor(parts[r][:len(got)]))
    with pytest.raises(ValueError, match="rank must be in"):
        DataLoader(ByteTokenizer(), 2, 16, spec=spec, rank=3, world_size=3)
    with pytest.raises(ValueError, match="B must be a positive int"):
        DataLoader(ByteTokenizer(), 0, 16, spec=spec)


@pytest.mark.parametrize("batch_docs", [1, 5])
def test_resume_gives_the_same_next_batches(spec, batch_docs):
    B, T = 2, 24
    make = lambda: DataLoader(ByteTokenizer(), B, T, spec=spec, seed=7, tokenizer_batch_size=batch_docs,
                              rank=1, world_size=2)
    reference = take(make(), 60)  # long enough to wrap both sources into a second epoch
    for k in (0, 1, 9, 33, 51):
        loader = make()
        take(loader, k)
        state = json.loads(json.dumps(loader.state_dict()))
        assert len(json.dumps(state)) < 2000
        resumed = make()
        resumed.load_state_dict(state)
        for (x, y), (rx, ry) in zip(reference[k:], take(resumed, 60 - k)):
            assert torch.equal(x, rx) and torch.equal(y, ry)
    # The state holds token positions, not tokenizer batches: another batch size resumes it too.
    loader = make()
    take(loader, 20)
    other = DataLoader(ByteTokenizer(), B, T, spec=spec, seed=7, tokenizer_batch_size=3, rank=1, world_size=2)
    other.load_state_dict([{}, loader.state_dict()])  # a list of every rank's state works too
    assert torch.equal(next(other)[0], reference[20][0])
    wrong = DataLoader(ByteTokenizer(), B, T, spec=spec, rank=0, world_size=4)
    with pytest.raises(DataError, match="exact resume needs the same ranks"):
        wrong.load_state_dict(loader.state_dict())


def test_validation_loader_is_deterministic_and_cycles(spec, caplog):
    a = take(build_val_loader(ByteTokenizer(), 2, 16, spec=spec, rank=0, world_size=1), 40)
    b = take(DataLoader(ByteTokenizer(), 2, 16, spec=spec, split="val", seed=123), 40)  # the seed plays no part
    assert all(torch.equal(x, bx) and torch.equal(y, by) for (x, y), (bx, by) in zip(a, b))
    val_text = bytes(t for t in stream_tokens(spec, split="val") if t != BOS).decode()
    assert "alpha-val-0" in val_text and "alpha-0 " not in val_text
    assert "starts epoch 2" in caplog.text  # 40 batches is more than the split holds


def test_real_tokenizer_on_the_first_users_mix(real_tokenizer):
    root = require_shared_data("pretrain")
    spec = ",".join(f"{os.path.join(root, s)}:{w}" for s, w in (("wikipedia", 0.45), ("books", 0.40), ("reddit", 0.15)))
    B, T = 4, 128
    loader = DataLoader(real_tokenizer, B, T, spec=spec, tokenizer_threads=2)
    x = torch.cat([x.reshape(-1) for x, _ in take(loader, 8)])
    bos, expected = real_tokenizer.get_bos_token_id(), []
    for text in iter_documents(spec):
        expected += [bos] + real_tokenizer.encode(text)
        if len(expected) > len(x):
            break
    assert torch.equal(x, torch.tensor(expected[:len(x)]))
    state = loader.state_dict()
    nxt = next(loader)
    resumed = DataLoader(real_tokenizer, B, T, spec=spec, tokenizer_threads=2)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[1], nxt[1])


def test_two_gloo_ranks_under_torchrun(spec, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "tests", "workers", "dataloader_worker.py"), spec, str(out)]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    docs0, docs1 = ranks[0]["docs"], ranks[1]["docs"]
    everything = list(iter_documents(spec, infinite=False))
    assert not set(docs0) & set(docs1)
    assert sorted(docs0 + docs1) == sorted(everything)  # none twice, none skipped
    assert ranks[0]["counts"] == ranks[1]["counts"] == [len(docs0), len(docs1)]
    assert ranks[0]["batches"] > 0 and ranks[1]["batches"] > 0
