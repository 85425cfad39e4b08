"""The report card: sections with machine-readable metrics, assembling from any subset of them,
the summary table, reset and the start stamp, code size, and plots from training logs."""
import json
import os
import re
import sys
import time

import pytest
import torch

from nanochat import report, report_plots
from nanochat.report import SECTION_ORDER, generate, read_section_metrics, reset, slugify, write_section

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def base(tmp_path, monkeypatch):
    """A private base directory per test: reset clears the report dir."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def read_report(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def summary_row(text, metric):
    """The cells of one summary-table row: [BASE, MID, SFT, RL]."""
    m = re.search(rf"^\| {re.escape(metric)} \|(.*)\|$", text.split("## Summary")[1], re.M)
    assert m, f"no summary row for {metric}"
    return [c.strip() for c in m.group(1).split("|")]


def test_write_section_two_args_and_metrics(base):
    path = write_section("Base model training", "| a | b |")
    assert path == os.path.join(str(base), "report", "base-model-training.md")
    text = read_report(path)
    assert text.startswith("## Base model training\n") and "| a | b |" in text
    json_path = path[:-3] + ".json"
    assert not os.path.exists(json_path)
    write_section("Base model training", "body", metrics={"val_bpb": torch.tensor(0.5), "CORE": None, "tag": "d4"})
    assert read_section_metrics("Base model training") == {"val_bpb": 0.5, "CORE": None, "tag": "d4"}
    # rewriting without metrics removes the stale JSON, so the summary never shows an old number
    write_section("Base model training", "body again")
    assert not os.path.exists(json_path)
    assert read_section_metrics("Base model training") == {}


def test_write_section_rejects_bad_input(base):
    with pytest.raises(ValueError, match="flat dict"):
        write_section("Chat SFT", "x", metrics={"nested": {"a": 1}})
    with pytest.raises(ValueError, match="flat dict"):
        write_section("Chat SFT", "x", metrics=[1, 2])
    assert not os.path.exists(os.path.join(str(base), "report", "chat-sft.md"))
    with pytest.raises(ValueError, match="not usable"):
        write_section("Report", "would overwrite report.md")
    with pytest.raises(ValueError, match="not usable"):
        write_section("!!!", "empty slug")


def test_generate_from_no_sections(base):
    path = generate(plots=False)
    text = read_report(path)
    assert path == os.path.join(str(base), "report", "report.md")
    for needle in ("# nanochat training report", "- Git: ", "- CPU: ", "- Memory: ", "- GPUs: ",
                   f"PyTorch {torch.__version__}", "Python ", "## Cost", "## Summary"):
        assert needle in text, needle
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert f"- Dependencies: {len(deps)} " in text
    m = re.search(r"- Code: ([\d,]+) lines in ([\d,]+) files, ([\d,]+) characters", text)
    assert m and int(m.group(2).replace(",", "")) > 10
    for metric in report.SUMMARY_METRICS:
        assert summary_row(text, metric.replace("_", " ")) == ["-"] * 4
    assert "Total wall clock time: unknown" in text
    assert "Cost" in text and "unknown" in text.split("## Cost")[1].split("##")[0]


def test_generate_from_partial_sections(base):
    write_section("Chat evaluation sft", "sft evals", {"ARC-Easy": 0.41, "arc_challenge": 0.3, "ChatCORE": 0.09})
    write_section("Zebra notes", "an extra section")
    write_section("Base model evaluation", "core table", {"CORE": 0.2219})
    write_section("Another extra", "x")
    write_section("Tokenizer training", "no metrics here")
    # a corrupt metrics file (a stage killed mid-write by hand, say) must not break assembly
    with open(os.path.join(str(base), "report", "midtraining.json"), "w") as f:
        f.write("{not json")
    text = read_report(generate(plots=False))
    order = [text.index(f"## {t}\n") for t in ("Tokenizer training", "Base model evaluation", "Chat evaluation sft",
                                                "Another extra", "Zebra notes")]
    assert order == sorted(order), "known sections in pipeline order, then the others sorted"
    assert text.index("## Zebra notes") < text.index("## Summary")
    assert summary_row(text, "CORE") == ["0.2219", "-", "-", "-"]
    assert summary_row(text, "ARC-Easy") == ["-", "-", "0.4100", "-"]
    assert summary_row(text, "ARC-Challenge") == ["-", "-", "0.3000", "-"]
    assert summary_row(text, "ChatCORE") == ["-", "-", "0.0900", "-"]
    assert summary_row(text, "MMLU") == ["-"] * 4


def test_generate_from_all_sections(base):
    stage_of = {t: s for s, titles in report.STAGE_SECTIONS.items() for t in titles}
    for i, title in enumerate(SECTION_ORDER):
        metrics = {"gpu_hours": 1.0}
        if title in stage_of:
            metrics.update({m: i + j / 10 for j, m in enumerate(report.SUMMARY_METRICS)})
        write_section(title, f"body of {title}", metrics)
    text = read_report(generate(plots=False))
    positions = [text.index(f"## {t}\n") for t in SECTION_ORDER]
    assert positions == sorted(positions)
    # every cell is filled, and the last section of each stage wins (e.g. the chat eval over the training run)
    last = {s: SECTION_ORDER.index(titles[-1]) for s, titles in report.STAGE_SECTIONS.items()}
    for j, metric in enumerate(report.SUMMARY_METRICS):
        expected = [f"{last[s] + j / 10:.4f}" for s in report.STAGE_SECTIONS]
        assert summary_row(text, metric.replace("_", " ")) == expected
    n = len(SECTION_ORDER)
    assert f"GPU-hours recorded by the stages: {n:.2f}" in text
    assert f"${n * report.DEFAULT_GPU_HOUR_COST:,.2f}" in text


def test_summary_reads_json_not_markdown(base):
    write_section("Base model evaluation", "| CORE | 0.9999 |")  # a number in the markdown only
    write_section("Chat evaluation mid", "x", {"mmlu": 0.31, "GSM-8K": 0.02, "human_eval": 0.05})
    text = read_report(generate(plots=False))
    assert summary_row(text, "CORE") == ["-"] * 4
    assert summary_row(text, "MMLU") == ["-", "0.3100", "-", "-"]
    assert summary_row(text, "GSM8K") == ["-", "0.0200", "-", "-"]
    assert summary_row(text, "HumanEval") == ["-", "0.0500", "-", "-"]


def test_cost_flag_and_cli(base, capsys):
    write_section("Base model training", "x", {"gpu_hours": 8.0})
    write_section("Chat SFT", "x", {"gpu_hours": 2.0})
    report.main(["generate", "--no-plots", "--gpu-hour-cost=2.5"])
    assert "report written" in capsys.readouterr().out
    text = read_report(os.path.join(str(base), "report", "report.md"))
    assert "GPU-hours recorded by the stages: 10.00" in text and "$25.00" in text and "$2.50 per GPU-hour" in text
    for bad in (["generate", "--gpu-hour-cost=-1"], ["bogus"], [], ["generate", "--nope"]):
        with pytest.raises(SystemExit) as e:
            report.main(bad)
        assert e.value.code == 2


def test_reset_clears_and_stamps(base):
    write_section("Chat SFT", "x", {"MMLU": 0.3})
    generate(plots=False)
    before = time.time()
    report.main(["reset"])
    report_dir = os.path.join(str(base), "report")
    assert os.listdir(report_dir) == [report.START_FILE]
    assert before - 1 <= report.read_start(report_dir) <= time.time()
    # pretend the run started 2 hours ago: generate reports the total wall time from the stamp
    with open(os.path.join(report_dir, report.START_FILE), "w") as f:
        json.dump({"start_unix": time.time() - 7200 - 5}, f)
    text = read_report(generate(plots=False))
    assert "Total wall clock time: 2h00m" in text
    assert "Run started: unknown" not in text
    assert "## Chat SFT" not in text
    assert summary_row(text, "MMLU") == ["-"] * 4


def test_code_size_with_and_without_git(monkeypatch):
    with_git = report.source_files()
    if report._run(["git", "rev-parse", "HEAD"]) is not None:
        assert "nanochat/report.py" in with_git and "pyproject.toml" in with_git
    monkeypatch.setattr(report, "_run", lambda *a, **k: None)  # as if git were absent
    walked = report.source_files()
    assert "nanochat/report.py" in walked and "pyproject.toml" in walked
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in walked)
    size = report.code_size()
    assert size["files"] == len(walked) and size["lines"] > 100 and size["chars"] > size["lines"]
    assert report.git_info() == {"commit": "unknown", "branch": "unknown", "dirty": "unknown"}


def test_dependencies_from_pyproject_or_installed_metadata(base, monkeypatch):
    """[project].dependencies of pyproject.toml; on Python 3.10 (no tomllib) the installed package's runtime
    requirements, extras left out; "unknown" in the report when neither can be read."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = os.path.join(REPO_ROOT, "pyproject.toml")
    with open(pyproject, "rb") as f:
        assert report.project_dependencies(pyproject) == tomllib.load(f)["project"]["dependencies"]
    assert report.project_dependencies(os.path.join(str(base), "no-pyproject.toml")) is None
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    installed = ['a>=1', 'b>=2; python_version < "3.11"', 'c>=3; extra == "web"', 'd; python_version >= "3" and extra == "dev"']
    monkeypatch.setattr(report.importlib.metadata, "requires", lambda name: installed if name == "nanochat" else None)
    assert report.project_dependencies(pyproject) == ['a>=1', 'b>=2; python_version < "3.11"']

    def not_installed(name):
        raise report.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(report.importlib.metadata, "requires", not_installed)
    assert report.project_dependencies(pyproject) is None
    assert "- Dependencies: unknown " in read_report(generate(plots=False))


def write_log(path, steps=60, eval_every=20):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for step in range(steps + 1):
            if step % eval_every == 0:
                f.write(json.dumps({"step": step, "val_bpb": 2.0 - step / 100, "total_training_flops": 1e9 * step}) + "\n")
            if step:
                f.write(json.dumps({"step": step, "loss": 5 - step / 30, "smooth_loss": 5 - step / 31, "lrm": 1 - step / steps,
                                    "dt": 0.1, "tok_per_sec": 1e4, "mfu": 0.3, "total_training_flops": 1e9 * step}) + "\n")
        f.write('{"step": 61, "loss"')  # a torn last line: the run was still writing


def test_read_log_skips_torn_lines(tmp_path):
    path = str(tmp_path / "log.jsonl")
    write_log(path)
    records = report_plots.read_log(path)
    assert len(records) == 60 + 4 and records[-1]["step"] == 60


def test_plots_from_training_logs(base):
    pytest.importorskip("matplotlib")
    reset()
    write_log(os.path.join(str(base), "base_checkpoints", "d4", "log.jsonl"))
    write_log(os.path.join(str(base), "sft_checkpoints", "d4", "log.jsonl"), steps=20, eval_every=5)
    old = os.path.join(str(base), "mid_checkpoints", "old-run", "log.jsonl")
    write_log(old)
    os.utime(old, (time.time() - 86400, time.time() - 86400))  # written before the reset: another run's
    text = read_report(generate())
    report_dir = os.path.join(str(base), "report")
    for name in ("plot-base-d4.png", "plot-sft-d4.png"):
        with open(os.path.join(report_dir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    assert not os.path.exists(os.path.join(report_dir, "plot-mid-old-run.png"))
    assert text.index("## Plots") < text.index("## Summary")
    text = read_report(generate(all_logs=True))
    assert "](plot-mid-old-run.png)" in text
    assert not [n for n in os.listdir(report_dir) if ".tmp" in n]


def test_plots_skipped_without_matplotlib(base, monkeypatch):
    write_log(os.path.join(str(base), "base_checkpoints", "d4", "log.jsonl"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    text = read_report(generate())
    assert "Plots skipped: matplotlib is not installed" in text
    assert "## Summary" in text


def test_slugify():
    assert slugify("Chat evaluation sft") == "chat-evaluation-sft"
    assert slugify("  Base model: loss!! ") == "base-model-loss"


def test_a_failing_plot_does_not_break_the_report(base, monkeypatch):
    pytest.importorskip("matplotlib")
    write_log(os.path.join(str(base), "base_checkpoints", "d4", "log.jsonl"))

    def broken(*args):
        raise RuntimeError("disk full")
    monkeypatch.setattr(report_plots, "plot_run", broken)
    text = read_report(generate())
    assert "Plot for base d4 failed: RuntimeError: disk full" in text and "## Summary" in text
    assert not [n for n in os.listdir(os.path.join(str(base), "report")) if n.endswith(".png")]
