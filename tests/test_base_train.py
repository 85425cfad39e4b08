"""Base pretraining end to end on CPU: learning, exact resume, kill safety, multi-process equivalence."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import FIXTURE_TEXT, REPO_ROOT
from nanochat import checkpoint as ck
from scripts import base_train


def _spec():
    """The in-repo fixture text: these tests are about the training mechanics, not the data."""
    return FIXTURE_TEXT


def _log(ckpt_dir):
    with open(os.path.join(ckpt_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(ckpt_dir):
    return {r["step"]: r["loss"] for r in _log(ckpt_dir) if "loss" in r}


def test_tiny_model_learns(tiny_checkpoint):
    ckpt_dir, result = tiny_checkpoint
    bpbs = [(r["step"], r["val_bpb"]) for r in _log(ckpt_dir) if "val_bpb" in r]
    assert [s for s, _ in bpbs] == [0, 20, 40]
    first, last = bpbs[0][1], bpbs[-1][1]
    assert last < first - 0.4, f"validation bpb fell only from {first:.3f} to {last:.3f}"
    assert ck.find_last_step(ckpt_dir) == 40
    meta = ck.read_meta(ck.step_dir(ckpt_dir, 40))
    assert meta["model_config"]["n_layer"] == 2 and meta["val_bpb"] == pytest.approx(result["val_bpb"])
    model, meta2 = ck.build_model(ckpt_dir, 40, "cpu")
    assert model.config.sequence_len == 64 and not model.training


SMALL = ["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--total-batch-size=128", "--eval-every=-1",
         "--eval-tokens=256", "--sample-every=-1"]
# the late-2025 reference recipe, and every part of the 2026 one switched on over the defaults (a second layer so
# that one of them has a sliding window)
REFERENCE = ["--warmdown-ratio=0.2", "--final-lr-frac=0", "--muon-ortho=newton-schulz", "--normuon=false", "--muon-wd=0",
             "--cautious-wd=false", "--wd-schedule=constant", "--residual-scalars=false", "--value-embeds=false"]
RECIPE = ["--depth=2", "--warmup-steps=1", "--residual-scalars", "--value-embeds", "--window-pattern=SL"]


@pytest.mark.parametrize("recipe", [REFERENCE, RECIPE], ids=["reference", "recipe"])
def test_resume_matches_uninterrupted_run(tokenizer, base_dir, monkeypatch, recipe):
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp32")  # bit-exact; bf16 kernels agree to ~1e-4 only
    flags = SMALL + recipe + [f"--data={_spec()}", "--num-iterations=12", "--save-every=6"]
    base_train.main(flags + ["--model-tag=straight"])
    base_train.main(flags + ["--model-tag=resumed"])
    resumed = os.path.join(ck.checkpoints_root("base"), "resumed")
    # as if the run had died after its step-6 checkpoint
    import shutil
    shutil.rmtree(ck.step_dir(resumed, 12))
    base_train.main(flags + ["--model-tag=resumed", "--resume=true"])
    straight = _losses(os.path.join(ck.checkpoints_root("base"), "straight"))
    after = _losses(resumed)
    assert sorted(after) == list(range(1, 13))  # the log reads as one run
    assert [after[s] for s in range(7, 13)] == [straight[s] for s in range(7, 13)]
    a, _, _ = ck.load_checkpoint(os.path.join(ck.checkpoints_root("base"), "straight"), 12, "cpu")
    b, _, _ = ck.load_checkpoint(resumed, 12, "cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_leaves_only_complete_checkpoints(tokenizer, base_dir):
    flags = SMALL + [f"--data={_spec()}", "--num-iterations=100000", "--save-every=1", "--model-tag=killed"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *flags], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(ck.checkpoints_root("base"), "killed")
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(ck.list_complete_steps(ckpt_dir)) < 3:
            time.sleep(0.05)
        assert len(ck.list_complete_steps(ckpt_dir)) >= 3, "training never wrote checkpoints"
        time.sleep(0.13)  # land somewhere inside a later step or save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = ck.find_last_step(ckpt_dir)
    ck.load_checkpoint(ckpt_dir, last, "cpu", load_optimizer=True, verify_hash=True)  # complete and intact
    # the run resumes from there and finishes
    out = base_train.main(SMALL + [f"--data={_spec()}", f"--num-iterations={last + 2}", "--save-every=1",
                                   "--model-tag=killed", "--resume=true"])
    assert ck.find_last_step(ckpt_dir) == last + 2 and out["steps"] == last + 2


@pytest.mark.parametrize("recipe", [REFERENCE, RECIPE], ids=["reference", "recipe"])
def test_two_ranks_equal_one_rank_with_accumulation(tokenizer, base_dir, recipe):
    """Same global batch split across 2 gloo ranks or across 2 accumulation steps: same model."""
    common = SMALL + recipe + [f"--data={_spec()}", "--num-iterations=4", "--grad-clip=0.5"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, NANOCHAT_DTYPE="fp32", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "scripts.base_train", *common, "--model-tag=one"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "scripts.base_train", *common, "--model-tag=two"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 rank(s) x 1 accumulation" in two.stdout and "1 rank(s) x 2 accumulation" in one.stdout
    root = ck.checkpoints_root("base")
    a, _, _ = ck.load_checkpoint(os.path.join(root, "one"), 4, "cpu")
    b, _, _ = ck.load_checkpoint(os.path.join(root, "two"), 4, "cpu")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    la, lb = _losses(os.path.join(root, "one")), _losses(os.path.join(root, "two"))
    assert [la[s] for s in range(1, 5)] == pytest.approx([lb[s] for s in range(1, 5)], rel=1e-4)


def test_bad_flags_and_missing_checkpoint(tokenizer, base_dir, capsys):
    for bad, message in ((["--device-batch-size=lots"], "--device-batch-size"),
                         (["--warmup-ratio=1.5"], "--warmup-ratio"),
                         (["--activation=tanh"], "--activation"),
                         (["--no-such-flag=1"], "unrecognized arguments")):
        with pytest.raises(SystemExit):
            base_train.get_args(bad)
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a multiple"):
        base_train.main(SMALL[:-3] + ["--total-batch-size=100", f"--data={_spec()}", "--num-iterations=1"])
    with pytest.raises(SystemExit, match="cannot resume"):
        base_train.main(SMALL + [f"--data={_spec()}", "--num-iterations=2", "--model-tag=never-trained", "--resume=true"])
    with pytest.raises(SystemExit, match="data path does not exist"):
        base_train.main(SMALL + ["--data=/nonexistent/corpus", "--num-iterations=2"])
