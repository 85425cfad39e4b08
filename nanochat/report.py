"""
The report card. Each stage writes its own section into $NANOCHAT_BASE_DIR/report/ and the
end of a run assembles them into report.md:

    python -m nanochat.report reset       # start of a run: clear the report dir, stamp the start time
    python -m nanochat.report generate    # end of a run: report.md (+ PNG plots, report_plots.py) from what is there

A section is `<slug>.md` (human-readable markdown). When the stage also passes `metrics` (a flat
dict), `<slug>.json` is written next to it: the summary table reads only those JSON files, never
the markdown. Metric names are matched ignoring case and punctuation ("ARC-Easy" = "arc_easy");
the ones the summary knows are SUMMARY_METRICS below, plus:
    gpu_hours                  GPU-hours the stage used (summed into the cost estimate)
    chars_per_token            on the "Tokenizer evaluation" section: text characters per token on the
                               training mix (scripts.plan reads it; bytes_per_token is the fallback)
Assembling never fails on missing, partial or unreadable sections: what is absent shows as "-".
"""
import glob
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import time
from datetime import datetime

import torch

from nanochat.common import atomic_write_text, format_duration, get_base_dir, make_parser, non_negative_float, str2bool

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_FILE = "_start.json"  # the reset stamp; a leading underscore can never be a section slug
REPORT_FILE = "report.md"

# Which sections feed each column of the summary table (pipeline order); a later section overrides an earlier one.
STAGE_SECTIONS = {
    "BASE": ["Base model training", "Base model loss", "Base model evaluation", "Chat quality base"],
    "MID": ["Midtraining", "Chat evaluation mid", "Chat quality mid"],
    "SFT": ["Chat SFT", "Chat evaluation sft", "Chat quality sft"],
    "RL": ["Chat RL", "Chat evaluation rl", "Chat quality rl"],
}
# Pipeline order of the known sections; any other section follows, sorted by file name. The Hugging Face
# sections (scripts.import_hf, scripts.export_hf) say where a model came from and where its export went.
SECTION_ORDER = (["Budget plan", "Tokenizer training", "Tokenizer evaluation", "Hugging Face import"]
                 + [title for titles in STAGE_SECTIONS.values() for title in titles] + ["Hugging Face export"])
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE", "train_bpb", "val_bpb",
                   # conversation quality (scripts.chat_quality, docs/chat_quality.md): bpb and gain on held-out
                   # conversations, then the serving-default replies' end, 4-gram repetition and English shares
                   "assistant_bpb", "context_gain", "reply_ended", "reply_repeat4", "reply_english"]
SOURCE_EXTS = (".py", ".sh", ".rs", ".html", ".js", ".css", ".toml", ".md")
BUILD_DIRS = ("__pycache__", "build", "dist")  # git-ignored output, left out of the code size without git
DEFAULT_GPU_HOUR_COST = 3.0  # $/GPU-hour, roughly an on-demand 8xH100 node rented per GPU


def get_report_dir():
    path = os.path.join(get_base_dir(), "report")
    os.makedirs(path, exist_ok=True)
    return path


def slugify(title):
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _norm(name):
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _check_metrics(metrics):
    if not isinstance(metrics, dict):
        raise ValueError(f"metrics must be a flat dict of name -> number/string, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise ValueError(f"metric names must be strings, got {k!r}")
        if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # a numpy or 0-d torch scalar
            v = v.item()
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise ValueError(f"metric {k!r} must be a number, string, bool or None (a flat dict), got {type(v).__name__}")
        out[k] = v
    return out


def write_section(title, body, metrics=None):
    """Write (or replace) one stage's section; returns the .md path. `body` is markdown; `metrics`,
    a flat dict, also goes to <slug>.json for the summary table (a stale one is removed when None)."""
    slug = slugify(title)
    if not slug or slug == "report":
        raise ValueError(f"section title {title!r} is not usable (its file name would be {slug or 'empty'!r})")
    path = os.path.join(get_report_dir(), slug + ".md")
    json_path = path[:-3] + ".json"
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    if metrics is not None:
        record = {"title": title, "timestamp": stamp, "metrics": _check_metrics(metrics)}
        atomic_write_text(json_path, json.dumps(record, indent=1) + "\n")
    elif os.path.exists(json_path):
        os.remove(json_path)
    atomic_write_text(path, f"## {title}\n\ntimestamp: {stamp}\n\n{body.rstrip()}\n")
    return path


def read_section_metrics(title, report_dir=None):
    """The metrics dict a section recorded, or {} when it has none (missing or unreadable file)."""
    path = os.path.join(report_dir or get_report_dir(), slugify(title) + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f).get("metrics", {})
        return metrics if isinstance(metrics, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}


def find_metric(metrics, name):
    """metrics[name] matching names without case or punctuation; None when absent."""
    return next((v for k, v in metrics.items() if _norm(k) == _norm(name)), None)

# -----------------------------------------------------------------------------
# Reset: a fresh report dir with the start time, so generate can tell the total wall time.

def reset():
    shutil.rmtree(get_report_dir())
    report_dir = get_report_dir()
    now = time.time()
    stamp = {"start_unix": now, "start_time": datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")}
    atomic_write_text(os.path.join(report_dir, START_FILE), json.dumps(stamp) + "\n")
    return report_dir


def read_start(report_dir):
    try:
        with open(os.path.join(report_dir, START_FILE), encoding="utf-8") as f:
            return float(json.load(f)["start_unix"])
    except (OSError, ValueError, KeyError, TypeError):
        return None

# -----------------------------------------------------------------------------
# Environment: git, hardware, software, code size. Each part answers "unknown" rather than failing.

def _run(cmd, cwd=REPO_ROOT):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def git_info():
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    if not commit:
        return {"commit": "unknown", "branch": "unknown", "dirty": "unknown"}
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"]) or "unknown"
    status = _run(["git", "status", "--porcelain"])
    dirty = "unknown" if status is None else ("dirty" if status.strip() else "clean")
    return {"commit": commit.strip(), "branch": branch.strip(), "dirty": dirty}


def cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware_info():
    import psutil  # a dependency, needed only here
    props = map(torch.cuda.get_device_properties, range(torch.cuda.device_count() if torch.cuda.is_available() else 0))
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "memory_gib": psutil.virtual_memory().total / 2**30,
            "gpus": [(p.name, p.total_memory / 2**30) for p in props]}


def project_dependencies(pyproject_path):
    """The project's runtime requirements: [project].dependencies of pyproject.toml, extras left out. Python
    3.10 has no TOML reader, so there they come from the installed package's metadata instead (what pip
    recorded at `pip install -e .`, runs/setup.sh). None when neither can be read: the report says "unknown"."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            requires = importlib.metadata.requires("nanochat") or []
        except importlib.metadata.PackageNotFoundError:
            return None
        return [r for r in requires if "extra" not in r.partition(";")[2]]
    try:
        with open(pyproject_path, "rb") as f:
            deps = tomllib.load(f).get("project", {}).get("dependencies")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return list(deps) if isinstance(deps, list) else None


def _is_build_output(dirpath, name):
    return (name.startswith(".") or name in BUILD_DIRS or name.endswith(".egg-info")
            or os.path.exists(os.path.join(dirpath, name, "pyvenv.cfg")))  # a virtual environment


def source_files(root=REPO_ROOT):
    """Source files of the repo: what git knows (tracked, plus untracked files not ignored) or, without
    git (an exported tree), every file except hidden folders, build output and virtual environments."""
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root)
    if listed:
        names = sorted(set(n for n in listed.split("\0") if n))
    else:
        names = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not _is_build_output(dirpath, d))
            names += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames]
    return [n for n in names if n.endswith(SOURCE_EXTS) and os.path.isfile(os.path.join(root, n))]


def code_size(root=REPO_ROOT):
    files, lines, chars, by_ext = 0, 0, 0, {}
    for name in source_files(root):
        try:
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        n = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        files, lines, chars = files + 1, lines + n, chars + len(text)
        ext = os.path.splitext(name)[1]
        by_ext[ext] = by_ext.get(ext, 0) + n
    return {"files": files, "lines": lines, "chars": chars, "lines_by_ext": by_ext,
            "dependencies": project_dependencies(os.path.join(root, "pyproject.toml"))}

# -----------------------------------------------------------------------------
# Sections and the summary table

def list_sections(report_dir):
    """Section slugs present, in pipeline order, then the others sorted."""
    present = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(report_dir, "*.md"))} - {REPORT_FILE[:-3]}
    known = [slugify(t) for t in SECTION_ORDER if slugify(t) in present]
    return known + sorted(present - set(known))


def load_all_metrics(report_dir):
    """{slug: metrics} of every readable <slug>.json."""
    slugs = [os.path.basename(p)[:-5] for p in glob.glob(os.path.join(report_dir, "*.json"))]
    metrics = {s: read_section_metrics(s, report_dir) for s in slugs if not s.startswith("_")}  # slugify(slug) == slug
    return {s: m for s, m in metrics.items() if m}


def _fmt(v):
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4f}"
    return "-" if v is None else str(v)


def summary_markdown(all_metrics, wall_seconds):
    """The summary table: each of SUMMARY_METRICS by stage, a later section of a stage overriding an earlier one."""
    table = {m: {} for m in SUMMARY_METRICS}
    for stage, titles in STAGE_SECTIONS.items():
        for title, m in itertools.product(titles, SUMMARY_METRICS):
            if (v := find_metric(all_metrics.get(slugify(title), {}), m)) is not None:
                table[m][stage] = v
    stages = list(STAGE_SECTIONS)
    lines = ["## Summary", "", "| Metric | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for m in SUMMARY_METRICS:
        lines.append(f"| {m.replace('_', ' ')} | " + " | ".join(_fmt(table[m].get(s)) for s in stages) + " |")
    wall = "unknown (no start stamp: run `python -m nanochat.report reset` at the start of a run)" \
        if wall_seconds is None else format_duration(wall_seconds)
    lines += ["", f"Total wall clock time: {wall}"]
    return "\n".join(lines)


def cost_markdown(all_metrics, gpu_hour_cost, wall_seconds, num_gpus):
    recorded = {slug: find_metric(m, "gpu_hours") for slug, m in all_metrics.items()}
    recorded = {k: float(v) for k, v in recorded.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rate = f"${gpu_hour_cost:.2f} per GPU-hour (--gpu-hour-cost; default {DEFAULT_GPU_HOUR_COST} is an H100 assumption)"
    if recorded:
        hours = sum(recorded.values())
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(recorded.items()))
        source = f"- GPU-hours recorded by the stages: {hours:.2f} ({parts})"
    elif num_gpus and wall_seconds is not None:
        hours = num_gpus * wall_seconds / 3600
        source = f"- No stage recorded GPU-hours; wall time x {num_gpus} GPU(s) = {hours:.2f} GPU-hours"
    else:
        return "- unknown: no stage recorded GPU-hours (metric `gpu_hours`) and no GPU run was timed"
    return f"{source}\n- Estimated cost at {rate}: ${hours * gpu_hour_cost:,.2f}"

# -----------------------------------------------------------------------------
# Assembling report.md

def header_markdown(start, now, hw, git, code):
    physical = f"{hw['physical_cores']} physical / " if hw["physical_cores"] else ""
    gpus = ", ".join(f"{name} ({mem:.0f} GiB)" for name, mem in hw["gpus"])
    exts = ", ".join(f"{e} {n:,}" for e, n in sorted(code["lines_by_ext"].items(), key=lambda kv: -kv[1]))
    deps = "unknown" if code["dependencies"] is None else len(code["dependencies"])
    started = "unknown" if start is None else datetime.fromtimestamp(start).astimezone().isoformat(timespec="seconds")
    return "\n".join([
        "# nanochat training report", "",
        f"Generated: {datetime.fromtimestamp(now).astimezone().isoformat(timespec='seconds')}  ",
        f"Run started: {started}", "",
        "## Environment", "",
        f"- Git: branch {git['branch']}, commit {git['commit']} ({git['dirty']})",
        f"- CPU: {hw['cpu']} ({physical}{hw['logical_cores']} logical cores)",
        f"- GPUs: {len(hw['gpus'])} x {gpus}" if hw["gpus"] else "- GPUs: none",
        f"- Memory: {hw['memory_gib']:.1f} GiB",
        f"- Software: Python {platform.python_version()}, PyTorch {torch.__version__}, {platform.platform()}",
        f"- Code: {code['lines']:,} lines in {code['files']:,} files, {code['chars']:,} characters"
        + (f" (lines by type: {exts})" if exts else ""),
        f"- Dependencies: {deps} (pyproject.toml [project].dependencies)",
    ])


def generate(gpu_hour_cost=DEFAULT_GPU_HOUR_COST, all_logs=False, plots=True):
    """Assemble report.md from whatever sections exist; returns its path. Never fails for
    missing or partial sections; plots are skipped with a note when matplotlib is missing."""
    report_dir = get_report_dir()
    now = time.time()
    start = read_start(report_dir)
    wall = None if start is None else now - start
    hw = hardware_info()
    all_metrics = load_all_metrics(report_dir)
    parts = [header_markdown(start, now, hw, git_info(), code_size()), "",
             "## Cost", "", cost_markdown(all_metrics, gpu_hour_cost, wall, len(hw["gpus"])), ""]
    for slug in list_sections(report_dir):
        try:
            with open(os.path.join(report_dir, slug + ".md"), encoding="utf-8", errors="replace") as f:
                parts += [f.read().rstrip(), ""]
        except OSError:
            continue
    if plots:
        from nanochat.report_plots import make_plots  # matplotlib is imported there, only when plotting
        parts += ["## Plots", ""]
        try:
            made, failed = make_plots(report_dir, get_base_dir(), since=None if all_logs else start)
            parts += [f"### {caption}\n\n![{caption}]({name})\n" for caption, name in made]
            parts += [f"Plot for {caption} failed: {err}\n" for caption, err in failed]
            if not made and not failed:
                since = "" if all_logs or start is None else " since the run started (--all-logs includes older ones)"
                parts += [f"No training logs (`<stage>_checkpoints/<tag>/log.jsonl`) found{since}.", ""]
        except ImportError:
            parts += ["Plots skipped: matplotlib is not installed (pip install 'nanochat[report]').", ""]
    parts.append(summary_markdown(all_metrics, wall))
    path = os.path.join(report_dir, REPORT_FILE)
    atomic_write_text(path, "\n".join(parts).rstrip() + "\n")
    return path


def main(argv=None):
    p = make_parser("Assemble the report card ($NANOCHAT_BASE_DIR/report/report.md) or reset it at the start of a run.")
    p.prog = "python -m nanochat.report"
    sub = p.add_subparsers(dest="command", required=True, metavar="{generate,reset}")
    g = sub.add_parser("generate", help="assemble report.md and plots from the sections written so far")
    g.add_argument("--gpu-hour-cost", type=non_negative_float, default=DEFAULT_GPU_HOUR_COST,
                   help="$ per GPU-hour for the cost estimate (the default is an H100 assumption)")
    g.add_argument("--all-logs", type=str2bool, default=False,
                   help="plot every training log found, not only those written since the last reset")
    g.add_argument("--plots", type=str2bool, default=True, help="draw the PNG plots (--no-plots skips them)")
    sub.add_parser("reset", help="clear the report dir and stamp the start time")
    args = p.parse_args(argv)
    if args.command == "reset":
        print(f"report reset: {reset()}")
    else:
        print(f"report written: {generate(args.gpu_hour_cost, args.all_logs, args.plots)}")


if __name__ == "__main__":
    main()
