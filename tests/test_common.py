import os
import subprocess
import sys

import pytest
import torch

from nanochat import common


def test_base_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "b"))
    assert common.get_base_dir() == str(tmp_path / "b")
    assert os.path.isdir(tmp_path / "b")


def test_device_override_and_validation(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DEVICE", "cpu")
    assert common.autodetect_device_type() == "cpu"
    with pytest.raises(ValueError, match="device type"):
        common.autodetect_device_type("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            common.autodetect_device_type("cuda")


def test_dtype_policy(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp32")
    assert common.get_compute_dtype("cpu") == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")
    assert common.get_compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "int3")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
        common.get_compute_dtype("cpu")
    monkeypatch.delenv("NANOCHAT_DTYPE")
    # without an override the CPU choice follows the measurement
    expected = torch.bfloat16 if common.cpu_bf16_is_faster() else torch.float32
    assert common.get_compute_dtype("cpu") == expected


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.bin"
    common.atomic_write_bytes(target, b"first")
    with pytest.raises(RuntimeError):
        with common.atomic_open(target, "wb") as f:
            f.write(b"half-written")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_cli_helpers_reject_bad_values():
    parser = common.make_parser("t")
    parser.add_argument("--flag", type=common.str2bool, default=False)
    parser.add_argument("--n", type=common.positive_int, default=1)
    assert parser.parse_args(["--flag=true", "--n=3"]).flag is True
    for bad in (["--flag=maybe"], ["--n=0"], ["--n=x"], ["--nope=1"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_compute_init_single_process():
    is_ddp, rank, local_rank, world, device = common.compute_init("cpu")
    assert (is_ddp, rank, local_rank, world, device.type) == (False, 0, 0, 1, "cpu")


def test_compute_init_two_gloo_ranks(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(
        "import torch, torch.distributed as dist\n"
        "from nanochat.common import compute_init, compute_cleanup\n"
        "ddp, rank, lr, ws, dev = compute_init('cpu')\n"
        "t = torch.tensor([rank + 1.0]); dist.all_reduce(t)\n"
        "assert ddp and ws == 2 and t.item() == 3.0, (ddp, ws, t)\n"
        f"open(r'{tmp_path}/rank%d' % rank, 'w').write('ok')\n"
        "compute_cleanup()\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    # each rank reports through its own file: the two processes' stdout can interleave
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["ok", "ok"]


def test_gpu_peak_table():
    assert common.gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert common.gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert common.gpu_peak_flops("NVIDIA H200") == 989e12
    assert common.gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert common.gpu_peak_flops("Some Future GPU") is None


def test_cpu_peak_is_measured():
    flops = common.get_peak_flops("cpu", torch.float32)
    assert 1e8 < flops < 1e14  # a real measurement of this machine, not a constant


# a few training steps of a tiny model; the last three, in steady state, should not fault memory in
FAULT_PROBE = """\
import resource, torch
from nanochat.common import keep_freed_memory
from nanochat.gpt import GPT, GPTConfig
tuned = keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = GPT(GPTConfig(sequence_len=256, vocab_size=4096, n_layer=2, n_head=2, n_kv_head=2, n_embd=128))
model.init_weights()
x, y = torch.randint(0, 4096, (2, 8, 256))
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.autocast("cpu", torch.bfloat16):
        model(x, y).backward()
    model.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, sum(faults[3:]))
"""


def _fault_probe(**env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=os.getcwd(), **env_extra)
    out = subprocess.run([sys.executable, "-c", FAULT_PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    tuned, faults = out.stdout.split()
    return tuned == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_memory_stops_refaulting_freed_buffers():
    tuned, faults_tuned = _fault_probe()
    untuned, faults_default = _fault_probe(NANOCHAT_TUNE_MALLOC="0")
    assert tuned and not untuned
    # glibc's default unmaps freed activation buffers and each step faults them in again (~12-20k
    # pages a step at this size); kept, they are reused
    assert faults_default > 3000, faults_default
    assert faults_tuned < faults_default / 5, (faults_tuned, faults_default)
    # the user's own malloc settings are left alone
    assert _fault_probe(MALLOC_ARENA_MAX="2")[0] is False


def test_bool_flags_as_people_type_them():
    """Every type=str2bool / auto_bool flag, in the parser or a group, takes --flag, --no-flag and --flag=VALUE."""
    from nanochat.common import auto_bool, make_parser, str2bool
    p = make_parser("t")
    p.add_argument("--resume", type=str2bool, default=False)
    g = p.add_argument_group("g")
    g.add_argument("--tie-embeddings", type=str2bool, default=True)
    g.add_argument("--compile", type=auto_bool, default="auto")
    parse = lambda *a: vars(p.parse_args(list(a)))
    assert parse() == {"resume": False, "tie_embeddings": True, "compile": "auto"}
    assert parse("--resume")["resume"] is True and parse("--resume=true")["resume"] is True
    assert parse("--resume=no")["resume"] is False and parse("--no-resume")["resume"] is False
    assert parse("--resume", "false")["resume"] is False
    assert parse("--no-tie-embeddings")["tie_embeddings"] is False
    assert [parse(*a)["compile"] for a in (["--compile"], ["--no-compile"], ["--compile=auto"], ["--compile=0"])] == \
        ["true", "false", "auto", "false"]
    for bad in (["--resume=maybe"], ["--no-resume=true"], ["--compile=sometimes"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    assert "--resume[=true|false], --no-resume" in p.format_help()


@pytest.mark.parametrize("script", ["base_train", "mid_train", "chat_sft", "chat_rl", "chat_cli", "chat_web", "chat_eval",
                                    "plan", "ablate", "base_eval", "base_loss", "tok_train", "tok_eval", "tok_import"])
def test_every_script_takes_bare_boolean_flags(script, capsys):
    """No script declares a boolean flag that `--flag` alone would reject: each one's parser is a make_parser and
    every true/false flag in its --help takes the bare and --no- forms (in-process: `main(["--help"])`)."""
    import importlib
    import re
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"scripts.{script}").main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage:" in out
    assert not re.search(r"\{true,false\}|\{auto,true,false\}|\{false,true\}", out), out
    for flag in re.findall(r"(--[a-z-]+)\[=(?:auto\|)?true\|false\]", out):
        assert f"--no-{flag[2:]}" in out
