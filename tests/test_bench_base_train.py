"""bench/base_train.py at a tiny size: it runs the real training script and the bare step and prints
its tables with finite positive figures; the GPU preset's plan checks out on CPU."""
import math
import os
import subprocess
import sys

from conftest import FIXTURE_TEXT, REPO_ROOT, markdown_rows

TINY = ["--depth=1", "--seq-len=32", "--device-batch-size=2", "--accum=2", "--steps=3", "--skip=1", "--rounds=1",
        "--compile=false"]


def _bench(*flags, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "bench.base_train", *flags], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _number(cell):
    return float(cell.replace(",", "").rstrip("%"))


def test_tiny_bench_prints_finite_tables(tokenizer, base_dir):
    r = _bench(*TINY, f"--data={FIXTURE_TEXT}", f"--tokenizer-dir={os.path.join(base_dir, 'tokenizer')}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "load average" in out
    steady = markdown_rows(out, "| compile | stat |")
    assert [row[:2] for row in steady] == [["false", "median"], ["false", "best"]]
    for row in steady:
        assert _number(row[2]) == 2 * 32 * 2  # tokens per optimizer step
        for cell in row[3:6] + row[8:10]:  # tokens/s and MFU
            assert math.isfinite(_number(cell)) and _number(cell) > 0, row
        for cell in row[6:8]:  # overheads may be either sign
            assert math.isfinite(_number(cell)), row
    assert "compile=false: overhead (line to line) round by round" in out and "median of the rounds" in out
    process = markdown_rows(out, "| compile | round |")
    assert len(process) == 1 and all(math.isfinite(_number(c)) and _number(c) >= 0 for c in process[0][2:])
    pieces = dict((row[0], row[1:]) for row in markdown_rows(out, "| piece |"))
    assert any(k.startswith("data loader") for k in pieces) and "sum" in pieces
    assert _number(pieces["sum"][0]) > 0
    costs = {row[0]: row[1] for row in markdown_rows(out, "| cost |")}
    assert _number(costs["process start + imports"]) > 0
    assert _number(costs["total wall"]) >= _number(costs["one-off total"]) > 0
    assert int(costs["steps until one-offs < 5% of the wall"].replace(",", "")) > 0


def test_gpu_preset_plan_and_bad_flags():
    r = _bench("--gpu", "--dry-run", timeout=60)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    plan = next(line for line in r.stdout.splitlines() if line.startswith("script (compile=true)"))
    for flag in ("--depth=20", "--max-seq-len=2048", "--device-batch-size=16", "--compile=true", "--device-type=cuda",
                 "--total-batch-size=65536", "--eval-every=-1", "--sample-every=-1"):
        assert flag in plan.split(), (flag, plan)
    assert "3.49" in r.stdout  # FLOPs/token of the depth-20, 65,536-vocab model
    bad = _bench("--compile=maybe", "--dry-run", timeout=60)
    assert bad.returncode != 0 and "--compile" in bad.stderr
    bad = _bench("--steps=2", "--skip=2", "--dry-run", timeout=60)
    assert bad.returncode != 0 and "--skip" in bad.stderr
