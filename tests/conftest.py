"""
Shared fixtures. Expensive artifacts (a small tokenizer, a tiny checkpoint) are built once per
test session and reused by every test that needs them.
"""
import os
import tempfile

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("NANOCHAT_SHARED_DATA", os.path.join(os.path.dirname(REPO_ROOT), "shared", "data"))

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
