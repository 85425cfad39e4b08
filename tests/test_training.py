import json

import pytest
import torch

from nanochat import training


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
