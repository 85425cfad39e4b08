"""
Shared fixtures. Expensive artifacts (a small tokenizer, a tiny checkpoint) are built once per
test session and reused by every test that needs them.
"""
import os
import tempfile

import pytest

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


@pytest.fixture(scope="session")
def shared_data():
    return require_shared_data()


@pytest.fixture(scope="session")
def base_dir():
    return _SESSION_BASE


TEST_VOCAB_SIZE = 4096  # big enough for real merges (words, digit pairs), small enough for tiny models


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    """A BPE tokenizer (vocab TEST_VOCAB_SIZE) trained once per session on ~3 MB of the shared English
    text (the users' 45/40/15 wikipedia/books/reddit mix, train split) and saved to
    $NANOCHAT_BASE_DIR/tokenizer, so get_tokenizer() and get_token_bytes() work in every test."""
    from nanochat.dataset import iter_documents
    from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
    from scripts.tok_train import training_texts
    pretrain = require_shared_data("pretrain")
    spec = ",".join(f"{os.path.join(pretrain, name)}:{w}" for name, w in (("wikipedia", 45), ("books", 40), ("reddit", 15)))
    texts = training_texts(iter_documents(spec, split="train", infinite=False), max_chars=3_000_000, doc_cap=10_000)
    tok = Tokenizer.train_from_iterator(texts, TEST_VOCAB_SIZE)
    tok.save(get_tokenizer_dir())
    return tok


TINY_TRAIN_FLAGS = ["--depth=2", "--max-seq-len=64", "--device-batch-size=4", "--total-batch-size=512",
                    "--num-iterations=40", "--eval-every=20", "--eval-tokens=4096", "--sample-every=-1",
                    "--core-metric-every=-1", "--warmdown-ratio=0.2"]


@pytest.fixture(scope="session")
def tiny_checkpoint(tokenizer):
    """One tiny base model (depth 2, 64-token context) trained for 40 steps on the shared English mix,
    saved as base checkpoint tag 'tiny'. Returns (checkpoint dir, training result dict)."""
    from nanochat.checkpoint import checkpoints_root
    from scripts.base_train import main
    pretrain = require_shared_data("pretrain")
    spec = ",".join(f"{os.path.join(pretrain, n)}:{w}" for n, w in (("wikipedia", 0.45), ("books", 0.40), ("reddit", 0.15)))
    result = main(TINY_TRAIN_FLAGS + [f"--data={spec}", "--model-tag=tiny"])
    return os.path.join(checkpoints_root("base"), "tiny"), result
