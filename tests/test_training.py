import json

import pytest
import torch

from nanochat import training
from scripts import _cli as stage_cli


def test_grad_accum_steps_divides_exactly():
    assert training.grad_accum_steps(524288, 32, 2048, 8) == 1
    assert training.grad_accum_steps(524288, 16, 2048, 8) == 2
    assert training.grad_accum_steps(4096, 4, 256, 1) == 4
    with pytest.raises(ValueError, match="not a multiple"):
        training.grad_accum_steps(1000, 4, 256, 1)


def test_lr_schedule_shape():
    n = 100
    lrs = [training.lr_multiplier(s, n, warmup_ratio=0.1, warmdown_ratio=0.2, final_lr_frac=0.1) for s in range(n + 1)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)   # warmup
    assert all(v == 1.0 for v in lrs[10:81])                                # constant
    assert lrs[90] == pytest.approx(0.55) and lrs[100] == pytest.approx(0.1)  # linear warmdown to final
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_muon_momentum_ramp():
    assert training.muon_momentum(0) == pytest.approx(0.85)
    assert training.muon_momentum(150) == pytest.approx(0.90)
    assert training.muon_momentum(300) == pytest.approx(0.95)
    assert training.muon_momentum(10_000) == pytest.approx(0.95)


def test_throughput_counts_all_tokens_and_divides_by_peak():
    # 8 ranks x 2 micro-steps x 16 rows x 2048 tokens in 2 s; 6e9 FLOPs/token; peak 8 x 989 TFLOP/s
    tokens = 8 * 2 * 16 * 2048
    tps, mfu = training.throughput(tokens, 2.0, 6e9, 8 * 989e12)
    assert tps == tokens / 2.0
    assert mfu == pytest.approx(tps * 6e9 / (8 * 989e12))


def test_set_learning_rates_uses_initial_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.5, "initial_lr": 0.5, "momentum": 0.0}])
    training.set_learning_rates([opt], 0.2, momentum=0.9)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and opt.param_groups[0]["momentum"] == 0.9


def test_find_device_batch_size_backs_off_on_oom():
    tried = []

    def try_batch(b):
        tried.append(b)
        if b > 8:
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert training.find_device_batch_size(try_batch, [1, 2, 4, 8, 16, 32], "cpu") == 8
    assert tried == [32, 16, 8]
    with pytest.raises(RuntimeError, match="does not fit"):
        training.find_device_batch_size(lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), [1, 2], "cpu")


def test_step_logger_writes_jsonl_and_truncates_on_resume(tmp_path):
    log = training.StepLogger(str(tmp_path), "dummy", {}, rank=0)
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s})
    log.truncate_after(3)
    rows = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    training.StepLogger(str(tmp_path), "dummy", {}, rank=1).log({"step": 9})  # other ranks never write
    assert len(open(tmp_path / "log.jsonl").readlines()) == 3


# ---- flags and start-up shared by the chat-stage scripts

def _stage_parser(stage="sft", sources=("mid", "base"), **optim):
    from nanochat.common import make_parser
    p = make_parser("test")
    stage_cli.add_run_flags(p)
    stage_cli.add_stage_io_flags(p, stage, sources)
    optim = optim or dict(init_lr_frac=0.5, warmdown_ratio=1.0)
    stage_cli.add_optimizer_flags(p.add_argument_group("optimization"), **optim)
    return p


def _parse(p, argv):
    args = p.parse_args(argv)
    stage_cli.check_optimizer_flags(p, args)
    return args


def test_stage_flags_defaults_and_sources():
    args = _parse(_stage_parser(), [])
    assert (args.run, args.device_type, args.seed) == ("dummy", "", 42)
    assert (args.source, args.model_tag, args.step, args.output_tag, args.resume, args.save_every) == \
        ("mid", None, None, None, False, -1)
    assert (args.embedding_lr, args.unembedding_lr, args.matrix_lr, args.weight_decay) == (0.2, 0.004, 0.02, 0.0)
    assert (args.init_lr_frac, args.warmdown_ratio, args.final_lr_frac, args.grad_clip) == (0.5, 1.0, 0.0, 1.0)
    assert not hasattr(args, "compile")
    args = _parse(_stage_parser(), ["--source=base", "--resume=true", "--init-lr-frac=0.1"])
    assert args.source == "base" and args.resume is True and args.init_lr_frac == 0.1
    mid = _stage_parser("mid", ("base",), init_lr_frac=1.0, warmdown_ratio=0.2, with_compile=True)
    assert _parse(mid, []).compile == "auto" and _parse(mid, []).warmdown_ratio == 0.2
    with pytest.raises(SystemExit):  # a stage with one source has no --source flag
        _parse(mid, ["--source=base"])
    with pytest.raises(SystemExit):
        _parse(_stage_parser(), ["--source=sft"])
    help_text = mid.format_help()
    assert "base checkpoint to continue" in help_text and "the last mid checkpoint" in help_text


@pytest.mark.parametrize("flag, message", [
    ("--warmdown-ratio=1.5", "argument --warmdown-ratio: must be between 0 and 1"),
    ("--final-lr-frac=-0.1", "argument --final-lr-frac: must be between 0 and 1"),
    ("--init-lr-frac=0", "argument --init-lr-frac: must be positive"),
])
def test_check_optimizer_flags_names_the_flag(flag, message, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(_stage_parser(), [flag])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script, init_lr_frac, warmdown_ratio", [
    ("mid_train", 1.0, 0.2), ("chat_sft", 0.02, 1.0), ("chat_rl", 0.05, 1.0)])
def test_chat_scripts_keep_their_own_defaults(script, init_lr_frac, warmdown_ratio):
    import importlib
    args = importlib.import_module(f"scripts.{script}").get_args([])
    assert (args.init_lr_frac, args.warmdown_ratio, args.final_lr_frac, args.grad_clip) == \
        (init_lr_frac, warmdown_ratio, 0.0, 1.0)
    assert hasattr(args, "compile") == (script == "mid_train") and hasattr(args, "source") == (script != "mid_train")


def test_setup_stage_optimizers_scales_every_rate():
    class Model:
        def setup_optimizers(self, **kw):
            return kw
    args = _parse(_stage_parser(), ["--init-lr-frac=0.5", "--weight-decay=0.1"])
    assert stage_cli.setup_stage_optimizers(Model(), args) == dict(
        unembedding_lr=0.002, embedding_lr=0.1, matrix_lr=0.01, weight_decay=0.1)
    # base_train's Muon variants: --muon-wd is the decay summed over the run, lambda = W / (matrix LR x steps)
    from scripts import base_train
    args = base_train.get_args(["--matrix-lr=0.04", "--muon-wd=10", "--normuon", "--cautious-wd", "--muon-ortho=polar-express",
                                "--scalar-lr=0.3"])
    assert stage_cli.setup_stage_optimizers(Model(), args, num_iterations=500) == dict(
        unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.04, weight_decay=0.0, muon_ortho="polar-express",
        normuon_beta2=0.95, muon_weight_decay=pytest.approx(10 / (0.04 * 500)), cautious_wd=True, scalar_lr=0.3)


def test_init_device_on_cpu():
    from nanochat.common import get_compute_dtype
    device_type, rank, world_size, device, dtype, autocast = training.init_device("cpu", seed=7)
    assert (device_type, rank, world_size, device) == ("cpu", 0, 1, torch.device("cpu"))
    assert dtype == get_compute_dtype("cpu")
    drawn = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(3))  # seeded
    with autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == dtype


def test_stage_start_errors_exit_with_the_script_name(tmp_path, monkeypatch):
    import argparse
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    args = _parse(_stage_parser(), ["--model-tag=nope"])
    with pytest.raises(SystemExit, match="^chat_sft: cannot load the mid model: "):
        stage_cli.open_stage_or_exit("chat_sft", "sft", args.source, "cpu", args)
    args.resume = True
    with pytest.raises(SystemExit, match="^chat_sft: cannot resume: "):
        stage_cli.open_stage_or_exit("chat_sft", "sft", args.source, "cpu", args)
    data = argparse.Namespace(mixture="no-such-mixture", extra_data="", eval_tasks="none")
    with pytest.raises(SystemExit, match="^mid_train: data error: unknown mixture 'no-such-mixture'"):
        stage_cli.load_chat_data_or_exit("mid_train", "mid", data)


def test_resume_or_exit(tmp_path, monkeypatch, capsys):
    logger = training.StepLogger(str(tmp_path), "dummy", {}, rank=0)
    for s in range(1, 6):
        logger.log({"step": s})
    with pytest.raises(SystemExit, match="^chat_rl: cannot resume: no checkpoint at "):
        stage_cli.resume_or_exit("chat_rl", logger, str(tmp_path / "missing"), 3, [], [], "cpu", "cpu")
    restored = []
    monkeypatch.setattr(stage_cli, "restore_training_state", lambda *a, **k: restored.append(a))
    stage_cli.resume_or_exit("chat_rl", logger, str(tmp_path), 3, [], [], "cpu", "cpu", world_size=1, accum=2)
    assert restored == [(str(tmp_path), 3, [], [], "cpu", "cpu", 0, 1, 2)]
    assert [json.loads(l)["step"] for l in open(tmp_path / "log.jsonl")] == [1, 2, 3]
    assert f"resumed from {tmp_path} step 3" in capsys.readouterr().out
