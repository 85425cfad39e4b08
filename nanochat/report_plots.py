"""
The report card's plots: one PNG per training run, drawn from the run's log.jsonl
($NANOCHAT_BASE_DIR/<stage>_checkpoints/<model_tag>/log.jsonl, written by training.StepLogger):
training loss and validation bpb against step and against training FLOPs, and the learning-rate
schedule. Optional: matplotlib is imported only here, and `python -m nanochat.report generate`
notes its absence instead of failing.
"""
import glob
import json
import os

from nanochat.checkpoint import SOURCES
from nanochat.report import slugify


def read_log(path):
    """The JSON records of a log.jsonl; a torn or bad line (a run still writing) is skipped."""
    records = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and isinstance(r.get("step"), (int, float)):
                    records.append(r)
    except OSError:
        pass
    return records


def find_logs(base_dir, since=None):
    """[(stage, model_tag, path)] of training logs, modified at or after `since` when given."""
    return [(stage, os.path.basename(os.path.dirname(path)), path) for stage in SOURCES
            for path in sorted(glob.glob(os.path.join(base_dir, f"{stage}_checkpoints", "*", "log.jsonl")))
            if since is None or os.path.getmtime(path) >= since]


def _series(records, x, y):
    pts = [(r[x], r[y]) for r in records if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(records, title, out_path):
    """One PNG per run: training loss and validation bpb against step and against training FLOPs,
    and the learning-rate multiplier. False when the log has nothing to plot."""
    from matplotlib.figure import Figure  # the object API draws with Agg and touches no global state
    train_key = "smooth_loss" if any("smooth_loss" in r for r in records) else "loss"
    val_key = "val_bpb" if any("val_bpb" in r for r in records) else "val_loss"
    if not any(train_key in r or val_key in r or "lrm" in r for r in records):
        return False
    fig = Figure(figsize=(16, 4.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, x, xlabel in ((axes[0], "step", "step"), (axes[1], "total_training_flops", "training FLOPs")):
        handles = []
        xs, raw = _series(records, x, "loss")
        if train_key == "smooth_loss" and xs:
            handles += ax.plot(xs, raw, color="tab:blue", alpha=0.25, lw=0.8, label="train loss")
        xs, ys = _series(records, x, train_key)
        if xs:
            label = "train loss (smoothed)" if train_key == "smooth_loss" else "train loss"
            handles += ax.plot(xs, ys, color="tab:blue", lw=1.5, label=label)
        ax.set(xlabel=xlabel, ylabel="train loss (nats/token)", title=f"loss vs {xlabel}")
        ax.grid(alpha=0.3)
        xs, ys = _series(records, x, val_key)
        if xs:
            ax2 = ax.twinx()
            label = "validation bpb" if val_key == "val_bpb" else "validation loss"
            handles += ax2.plot(xs, ys, "o-", color="tab:orange", ms=3, lw=1.2, label=label)
            ax2.set_ylabel(f"validation {'bits/byte' if val_key == 'val_bpb' else 'loss'}")
        if handles:
            ax.legend(handles=handles, loc="upper right", fontsize=8)
    xs, ys = _series(records, "step", "lrm")
    axes[2].plot(xs, ys, color="tab:green")
    axes[2].set(xlabel="step", ylabel="LR multiplier", title="learning-rate schedule")
    axes[2].grid(alpha=0.3)
    fig.suptitle(title)
    fig.savefig(out_path)
    return True


def make_plots(report_dir, base_dir, since=None):
    """Writes plot-<stage>-<tag>.png next to report.md; returns ([(caption, file name)], [(caption, error)]).
    Raises ImportError when matplotlib is missing; any other failure skips that one plot."""
    import matplotlib  # noqa: F401  (fail early and clearly)
    for old in glob.glob(os.path.join(report_dir, "plot-*.png")):
        os.remove(old)
    made, failed = [], []
    for stage, tag, path in find_logs(base_dir, since):
        name = f"plot-{stage}-{slugify(tag) or 'run'}.png"
        caption = f"{stage} {tag}"
        tmp = os.path.join(report_dir, name + ".tmp.png")
        try:
            if plot_run(read_log(path), f"{caption}  ({os.path.relpath(path, base_dir)})", tmp):
                os.replace(tmp, os.path.join(report_dir, name))
                made.append((caption, name))
        except Exception as e:  # a report is still worth having without one plot
            failed.append((caption, f"{type(e).__name__}: {e}"))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return made, failed
