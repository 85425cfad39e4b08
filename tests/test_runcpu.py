"""The README's main command, end to end with reduced sizes (slow: run with `pytest -m slow`)."""
import os
import subprocess

import pytest

from conftest import REPO_ROOT, SHARED_DATA, require_shared_data


@pytest.mark.slow
def test_runcpu_pipeline_end_to_end(tmp_path):
    require_shared_data("pretrain")
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path / "base"), VOCAB_SIZE="1024", TOK_MAX_CHARS="2000000",
               DEPTH="2", SEQ_LEN="128", BASE_STEPS="10", MID_STEPS="4", SFT_STEPS="4", EVAL_ITEMS="4")
    env.pop("NANOCHAT_DTYPE", None)
    out = subprocess.run(["bash", "runs/runcpu.sh", SHARED_DATA], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = open(tmp_path / "base" / "report" / "report.md").read()
    for section in ("Tokenizer training", "Base model training", "Base model evaluation", "Midtraining", "Chat SFT",
                    "Chat evaluation sft"):
        assert section in report, section
    assert "scripts.chat_cli -i sft" in out.stdout
