"""
Shared fixtures. Expensive artifacts (a small tokenizer, a tiny checkpoint) are built once per
test session, when a test first asks for them, and reused by every test that needs them. They are
trained on text kept in tests/fixtures, so a checkout without ../shared/data runs every test that
is not about real data; those few ask for the data through require_shared_data (or mix_spec /
mix_tokenizer), which skips them with a message naming what is missing.
"""
import os
import tempfile

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = (os.environ.get("NANOCHAT_DATA_DIR") or os.environ.get("NANOCHAT_SHARED_DATA")
               or os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"))

# Every test runs against a private base directory, never the user's ~/.cache/nanochat.
_SESSION_BASE = tempfile.mkdtemp(prefix="nanochat-test-base-")
os.environ["NANOCHAT_BASE_DIR"] = _SESSION_BASE
os.environ.setdefault("NANOCHAT_DTYPE", "fp32")  # exact comparisons in tests; benches measure bf16


def require_shared_data(*parts):
    """Path under ../shared/data, or skip the test saying clearly what is missing."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        pytest.skip(f"shared data missing: {path} (tests that read real text need ../shared/data; see README)")
    return path


@pytest.fixture()
def one_thread():
    """Tiny models run fastest on one thread (two spinning OpenMP threads crawl on a shared machine); a module
    opts in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def base_dir():
    return _SESSION_BASE


# -----------------------------------------------------------------------------
# The in-repo fixture: tests/fixtures/text holds ~49 KB of everyday English written for these tests
# (home, places, science, work, leisure, history, short stories) as .txt files, documents separated by
# blank lines, and val.txt as the validation split. It is a data spec like any other (README, "Bring
# your own data"), so the session tokenizer and the tiny checkpoint need nothing outside the repo.

FIXTURE_TEXT = os.path.join(REPO_ROOT, "tests", "fixtures", "text")
# tests/fixtures/chat: conversations in the {"messages": [...]} JSONL format, also written for these tests:
# questions.jsonl (24 single-turn questions), tasks.jsonl (20 requests: multi-turn, system prompts, tool calls)
FIXTURE_CHAT = os.path.join(REPO_ROOT, "tests", "fixtures", "chat")
TEST_VOCAB_SIZE = 4096  # big enough for real merges (words, digit pairs), small enough for tiny models;
# the fixture text supports ~4,450 merges, so the vocabulary is exactly this size


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    """A BPE tokenizer (vocab TEST_VOCAB_SIZE) trained once per session on the in-repo fixture text (train
    split) and saved to $NANOCHAT_BASE_DIR/tokenizer, so get_tokenizer() and get_token_bytes() work in
    every test."""
    from nanochat.dataset import iter_documents
    from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
    tok = Tokenizer.train_from_iterator(iter_documents(FIXTURE_TEXT, split="train", infinite=False), TEST_VOCAB_SIZE)
    assert tok.get_vocab_size() == TEST_VOCAB_SIZE, "the fixture text no longer supports TEST_VOCAB_SIZE"
    tok.save(get_tokenizer_dir())
    return tok


TINY_TRAIN_FLAGS = ["--depth=2", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=512",
                    "--num-iterations=40", "--eval-every=20", "--eval-tokens=4096", "--sample-every=-1",
                    "--core-metric-every=-1", "--warmdown-ratio=0.2"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tokenizer):
    """One tiny base model (depth 2, 64-token context) trained for 40 steps on the in-repo fixture text,
    saved as base checkpoint tag 'tiny'. Returns (checkpoint dir, training result dict)."""
    from nanochat.checkpoint import checkpoints_root
    from scripts.base_train import main
    result = main(TINY_TRAIN_FLAGS + [f"--data={FIXTURE_TEXT}", "--model-tag=tiny"])
    return os.path.join(checkpoints_root("base"), "tiny"), result

# -----------------------------------------------------------------------------
# Real data: only for tests about figures on the users' English mix. Built when a test asks for it.


def mix_spec():
    """The users' 45/40/15 wikipedia/books/reddit mix under ../shared/data/pretrain as a data spec (or skip)."""
    pretrain = require_shared_data("pretrain")
    return ",".join(f"{os.path.join(pretrain, n)}:{w}" for n, w in (("wikipedia", 0.45), ("books", 0.40), ("reddit", 0.15)))


@pytest.fixture(scope="session")
def mix_tokenizer():
    """A BPE tokenizer (vocab TEST_VOCAB_SIZE) trained on ~3 MB of the shared English mix (train split),
    for tests of its figures on real text. Kept in memory only: the tokenizer saved in the session's
    base dir stays the fixture one, which the tiny checkpoint was trained with."""
    from nanochat.dataset import iter_documents
    from nanochat.tokenizer import Tokenizer
    from scripts.tok_train import training_texts
    texts = training_texts(iter_documents(mix_spec(), split="train", infinite=False), max_chars=3_000_000, doc_cap=10_000)
    return Tokenizer.train_from_iterator(texts, TEST_VOCAB_SIZE)


def markdown_rows(out, header_start):
    """Rows (lists of cells) of the markdown table in `out` whose header begins with `header_start`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows
