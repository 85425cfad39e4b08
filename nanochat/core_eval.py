"""
The DCLM CORE metric for base models.

A bundle of in-context-learning tasks (core.yaml + eval_meta_data.csv + eval_data/*.jsonl) is
scored with a plain next-token model:
- multiple_choice: one sequence per choice, the choice with the lowest mean loss over its tokens wins
- schema: one sequence per context option with a fixed continuation, lowest mean loss wins
- language_modeling: correct only if every continuation token is the argmax prediction
Each task's accuracy is centered on its random baseline, and CORE is the mean centered accuracy.
The bundle comes from --eval-dir or a one-time download from $NANOCHAT_EVAL_BUNDLE_URL.
"""
import csv
import json
import os
import posixpath
import random
import re
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import atomic_open, get_base_dir, print0
from nanochat.download import DownloadError, download_file

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # few-shot examples for item i are drawn with random.Random(FEWSHOT_SEED + i)
ORDER_SEED = 1337    # items are evaluated in this shuffled order, so --max-per-task takes a fair sample
REQUIRED_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}

# -----------------------------------------------------------------------------
# The task bundle

@dataclass
class CoreTask:
    label: str
    dataset_uri: str            # relative to <eval_dir>/eval_data/
    task_type: str              # one of TASK_TYPES
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float      # in percent, as in eval_meta_data.csv


def _parse_scalar(text, where):
    """One YAML flow scalar: "double quoted", 'single quoted', [a, list], int, float, bool, or plain text."""
    if not text:
        raise ValueError(f"{where}: nested blocks are not supported here, expected `key: value`")
    if text[0] == '"':
        try:  # YAML double-quoted escapes (\n, \", \\, \t, \uXXXX) are the JSON ones
            value, end = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: cannot parse the quoted string {text}: {e.msg}") from None
        rest = text[end:].strip()
    elif text[0] == "'":
        m = re.match(r"'((?:[^']|'')*)'", text)
        if not m:
            raise ValueError(f"{where}: unterminated single-quoted string {text}")
        value, rest = m.group(1).replace("''", "'"), text[m.end():].strip()
    elif text[0] == "[":
        text = re.split(r"\s#", text, maxsplit=1)[0].rstrip()
        if not text.endswith("]"):
            raise ValueError(f"{where}: a flow list must be on one line and end with ']': {text}")
        inner = text[1:-1].strip()
        return [_parse_scalar(part.strip(), where) for part in inner.split(",")] if inner else []
    else:
        plain = re.split(r"\s#", text, maxsplit=1)[0].strip()  # drop a trailing comment
        if plain in ("true", "True", "false", "False"):
            return plain in ("true", "True")
        for kind in (int, float):
            try:
                return kind(plain)
            except ValueError:
                pass
        if plain[0] in "{&*!|>":
            raise ValueError(f"{where}: unsupported YAML syntax {text!r}")
        return plain
    if rest and not rest.startswith("#"):
        raise ValueError(f"{where}: unexpected text after the string: {rest!r}")
    return value


def parse_core_yaml(text, source="core.yaml"):
    """The `icl_tasks:` list of core.yaml as a list of dicts. Only the small YAML subset such files
    use is accepted (a top-level `icl_tasks:` list of flat `key: scalar` mappings); anything else is
    an error naming the line, rather than a silent misread."""
    tasks, item, in_list = [], None, False
    for lineno, raw in enumerate(text.splitlines(), 1):
        body = raw.strip()
        if not body or body.startswith("#") or body == "---":
            continue
        where = f"{source}:{lineno}"
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"{where}: tabs are not allowed in YAML indentation")
        if not raw[0].isspace() and not body.startswith("-"):
            key, _, rest = body.partition(":")
            if key.strip() == "icl_tasks" and not rest.strip():
                in_list, item = True, None
                continue
            raise ValueError(f"{where}: expected the top-level key `icl_tasks:`, got {body!r}")
        if not in_list:
            raise ValueError(f"{where}: content before the top-level `icl_tasks:` key")
        if body.startswith("-"):
            item = {}
            tasks.append(item)
            body = body[1:].strip()
            if not body:
                continue
        if item is None:
            raise ValueError(f"{where}: expected a `-` list item under `icl_tasks:`")
        key, sep, rest = body.partition(":")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"{where}: expected `key: value`, got {body!r}")
        if key in item:
            raise ValueError(f"{where}: duplicate key {key!r}")
        item[key] = _parse_scalar(rest.strip(), where)
    if not in_list:
        raise ValueError(f"{source}: no `icl_tasks:` list found")
    return tasks


def load_random_baselines(path):
    """{task label: random baseline in percent} from eval_meta_data.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "Eval Task" not in fields or "Random baseline" not in fields:
            raise ValueError(f"{path}: expected the columns 'Eval Task' and 'Random baseline', got {fields}")
        baselines = {}
        for row in reader:
            try:
                b = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: task {row['Eval Task']!r} has a bad random baseline {row['Random baseline']!r}") from None
            if not 0 <= b < 100:
                raise ValueError(f"{path}: task {row['Eval Task']!r} random baseline {b} is not a percentage in [0, 100)")
            baselines[row["Eval Task"].strip()] = b
    return baselines


def _task_from_entry(entry, baselines, where):
    for key in ("label", "dataset_uri", "icl_task_type", "num_fewshot"):
        if key not in entry:
            raise ValueError(f"{where}: task entry {entry} has no {key!r}")
    label = str(entry["label"])
    task_type = entry["icl_task_type"]
    if task_type not in TASK_TYPES:
        raise ValueError(f"{where}: task {label!r} has icl_task_type {task_type!r}, expected one of {TASK_TYPES}")
    shots = entry["num_fewshot"]
    if isinstance(shots, list):
        if not shots:
            raise ValueError(f"{where}: task {label!r} has an empty num_fewshot list")
        shots = shots[0]  # the bundle allows a sweep; CORE uses one setting, the first
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise ValueError(f"{where}: task {label!r} has num_fewshot {entry['num_fewshot']!r}, expected an integer >= 0")
    if label not in baselines:
        raise ValueError(f"{where}: task {label!r} has no 'Random baseline' row in eval_meta_data.csv")
    delimiter = entry.get("continuation_delimiter", " ")
    if not isinstance(delimiter, str):
        raise ValueError(f"{where}: task {label!r} continuation_delimiter must be a string, got {delimiter!r}")
    return CoreTask(label, str(entry["dataset_uri"]), task_type, shots, delimiter, baselines[label])


def load_bundle(eval_dir):
    """(tasks whose data file is present, labels of tasks whose data file is missing), in core.yaml order."""
    yaml_path = os.path.join(eval_dir, "core.yaml")
    meta_path = os.path.join(eval_dir, "eval_meta_data.csv")
    for path in (yaml_path, meta_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {eval_dir} is not a CORE eval bundle "
                                    "(expected core.yaml, eval_meta_data.csv and eval_data/)")
    with open(yaml_path, encoding="utf-8") as f:
        entries = parse_core_yaml(f.read(), yaml_path)
    baselines = load_random_baselines(meta_path)
    present, missing, seen = [], [], set()
    for entry in entries:
        task = _task_from_entry(entry, baselines, yaml_path)
        if task.label in seen:
            raise ValueError(f"{yaml_path}: task {task.label!r} is listed twice")
        seen.add(task.label)
        exists = os.path.isfile(os.path.join(eval_dir, "eval_data", task.dataset_uri))
        (present if exists else missing).append(task if exists else task.label)
    return present, missing


def _validate_item(item, task_type, where):
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object")
    for key in REQUIRED_FIELDS[task_type]:
        if key not in item:
            raise ValueError(f"{where}: a {task_type} item needs {REQUIRED_FIELDS[task_type]}, {key!r} is missing")
    options = item.get("choices", item.get("context_options"))
    if options is not None:
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{where}: expected a list of at least two strings, got {options!r}")
        gold = item["gold"]
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
            raise ValueError(f"{where}: gold {gold!r} is not an index into its {len(options)} options")
    if "continuation" in item and not isinstance(item["continuation"], str):
        raise ValueError(f"{where}: continuation must be a string")


def load_task_items(eval_dir, task):
    """The validated rows of one task's JSONL file."""
    path = os.path.join(eval_dir, "eval_data", task.dataset_uri)
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            _validate_item(item, task.task_type, f"{path}:{lineno}")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items

# -----------------------------------------------------------------------------
# Prompts

def sample_fewshot(num_items, idx, k):
    """k distinct item indices other than idx, the same on every run and every rank."""
    k = min(k, num_items - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(num_items - 1), k)
    return [j + (j >= idx) for j in picks]  # skip over idx itself


def _example_text(task, item):
    """A solved example as it appears among the few-shot examples."""
    d = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        return item["query"] + d + item["choices"][item["gold"]]
    if task.task_type == "schema":
        return item["context_options"][item["gold"]] + d + item["continuation"]
    return item["context"] + d + item["continuation"]


def render_item(task, items, idx):
    """The prompts of item idx as (context, continuation) pairs, one per sequence to score."""
    item, d = items[idx], task.continuation_delimiter
    shots = [_example_text(task, items[j]) for j in sample_fewshot(len(items), idx, task.num_fewshot)]
    prefix = "".join(s + "\n\n" for s in shots)
    if task.task_type == "multiple_choice":
        pairs = [(prefix + item["query"] + d, choice) for choice in item["choices"]]
    elif task.task_type == "schema":
        pairs = [(prefix + option + d, item["continuation"]) for option in item["context_options"]]
    else:
        pairs = [(prefix + item["context"] + d, item["continuation"])]
    return pairs


def _common_prefix_len(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_item(tokenizer, pairs):
    """Token ids (BOS first) of each context+continuation, and the [start, end) span of the
    continuation. The span starts where the tokens of the full prompt stop matching the tokens
    of the context alone, so a tokenizer that merges the delimiter into the continuation
    (" " + "Paris" -> " Paris") still gets exactly the continuation's tokens."""
    bos = tokenizer.get_bos_token_id()
    contexts = tokenizer.encode([c for c, _ in pairs], prepend=bos)
    fulls = tokenizer.encode([c + k for c, k in pairs], prepend=bos)
    spans = []
    for (c, k), ctx, full in zip(pairs, contexts, fulls):
        start = _common_prefix_len(ctx, full)
        if start >= len(full):
            raise ValueError(f"the continuation {k!r} has no tokens of its own after the context {c[-80:]!r}")
        spans.append((start, len(full)))
    return fulls, spans


def crop_left(seqs, spans, max_len):
    """Keep the last max_len tokens of each sequence, shifting its span to match. A continuation
    that does not fit is scored from the second kept token on (the first has no prediction)."""
    out_seqs, out_spans = [], []
    for seq, (start, end) in zip(seqs, spans):
        cut = max(0, len(seq) - max_len)
        out_seqs.append(seq[cut:])
        out_spans.append((max(start - cut, 1), end - cut))
    return out_seqs, out_spans

# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_sequences(model, seqs, spans, pad_id, device):
    """One forward pass over the sequences, right-padded with pad_id (causal attention, so the
    padding never affects the real positions). Returns, per sequence, the mean cross-entropy over
    its continuation tokens and whether every continuation token was the argmax prediction."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids)
    losses, exact = [], []
    for i, (start, end) in enumerate(spans):
        pred = logits[i, start - 1 : end - 1].float()  # the logits at t predict the token at t+1
        target = ids[i, start:end]
        losses.append(F.cross_entropy(pred, target))
        exact.append((pred.argmax(dim=-1) == target).all())
    return torch.stack(losses).tolist(), torch.stack(exact).tolist()  # one device sync, not one per row


def evaluate_item(model, tokenizer, task, items, idx, device):
    """True when the model gets item idx right."""
    seqs, spans = tokenize_item(tokenizer, render_item(task, items, idx))
    seqs, spans = crop_left(seqs, spans, model.config.sequence_len)
    losses, exact = score_sequences(model, seqs, spans, tokenizer.get_bos_token_id(), device)
    if task.task_type == "language_modeling":
        return exact[0]
    return min(range(len(losses)), key=losses.__getitem__) == items[idx]["gold"]


def _dist_rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_task(model, tokenizer, task, items, device, max_items=-1):
    """(accuracy, number of items evaluated). Under torch.distributed each rank takes every
    world_size-th item and the counts are summed across ranks."""
    order = list(range(len(items)))
    random.Random(ORDER_SEED).shuffle(order)
    if max_items > 0:
        order = order[:max_items]
    rank, world_size = _dist_rank_world()
    correct = sum(evaluate_item(model, tokenizer, task, items, idx, device) for idx in order[rank::world_size])
    if world_size > 1:
        on = device if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([correct], dtype=torch.long, device=on)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        correct = int(t.item())
    return correct / len(order), len(order)


def centered_accuracy(accuracy, random_baseline):
    """Rescale so chance is 0 and perfect is 1; random_baseline is in percent."""
    b = random_baseline / 100.0
    return (accuracy - b) / (1.0 - b)


def evaluate_core(model, tokenizer, eval_dir, max_per_task=-1, device=None):
    """Evaluate every task of the bundle whose data is present. Returns
    {"core": mean centered accuracy, "results": {label: {...}}, "missing": [labels], ...}."""
    tasks, missing = load_bundle(eval_dir)
    if not tasks:
        raise FileNotFoundError(f"none of the CORE task files listed in {eval_dir}/core.yaml exist under {eval_dir}/eval_data")
    device = device if device is not None else model.get_device()
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            t0 = time.time()
            items = load_task_items(eval_dir, task)
            acc, n = evaluate_task(model, tokenizer, task, items, device, max_per_task)
            centered = centered_accuracy(acc, task.random_baseline)
            results[task.label] = {"accuracy": acc, "centered": centered, "num_items": n,
                                   "random_baseline": task.random_baseline, "task_type": task.task_type,
                                   "num_fewshot": task.num_fewshot}
            print0(f"CORE {task.label:<34} {task.task_type:<18} shots={task.num_fewshot:<2} n={n:<6} "
                   f"acc={acc:.4f} centered={centered:+.4f} ({time.time() - t0:.1f}s)")
    finally:
        model.train(was_training)
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"core": core, "results": results, "missing": missing, "max_per_task": max_per_task,
            "eval_dir": os.path.abspath(eval_dir)}

# -----------------------------------------------------------------------------
# Output: stdout table, CSV, report section

def format_results_table(out):
    lines = [f"{'Task':<36} {'Accuracy':>9} {'Centered':>9} {'Items':>7}"]
    for label, r in out["results"].items():
        lines.append(f"{label:<36} {r['accuracy']:>9.4f} {r['centered']:>9.4f} {r['num_items']:>7}")
    lines.append(f"{'CORE':<36} {'':>9} {out['core']:>9.4f}")
    if out["missing"]:
        lines.append(f"missing tasks (not in CORE): {', '.join(out['missing'])}")
    return "\n".join(lines)


def write_results_csv(out, tag):
    """$NANOCHAT_BASE_DIR/base_eval/core_<tag>.csv, written atomically; returns its path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", str(tag)).strip("._") or "model"
    path = os.path.join(get_base_dir(), "base_eval", f"core_{safe}.csv")
    with atomic_open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["Task", "Accuracy", "Centered", "Items", "Status"])
        for label, r in out["results"].items():
            w.writerow([label, f"{r['accuracy']:.6f}", f"{r['centered']:.6f}", r["num_items"], "ok"])
        for label in out["missing"]:
            w.writerow([label, "", "", 0, "missing"])
        w.writerow(["CORE", "", f"{out['core']:.6f}", "", ""])
    return path


def report_markdown(out, info=None):
    """The report-card body: run info, CORE, the per-task table and the missing tasks."""
    lines = [f"- {k}: {v}" for k, v in (info or {}).items()]
    lines.append(f"- max per task: {out['max_per_task'] if out['max_per_task'] > 0 else 'all'}")
    lines.append(f"- CORE: {out['core']:.4f} (mean centered accuracy over {len(out['results'])} tasks)")
    lines.append(f"- missing tasks: {', '.join(out['missing']) if out['missing'] else 'none'}")
    lines += ["", "| Task | Type | Shots | Items | Accuracy | Centered |", "|---|---|---|---|---|---|"]
    for label, r in out["results"].items():
        lines.append(f"| {label} | {r['task_type']} | {r['num_fewshot']} | {r['num_items']} | "
                     f"{r['accuracy']:.4f} | {r['centered']:.4f} |")
    return "\n".join(lines)


def write_report(out, info=None):
    from nanochat.report import write_section
    return write_section("Base model evaluation", report_markdown(out, info), metrics={"CORE": out["core"]})

# -----------------------------------------------------------------------------
# Getting the bundle: a local directory, or a one-time download of a zip / tar.gz archive

EVAL_BUNDLE_URL_ENV = "NANOCHAT_EVAL_BUNDLE_URL"
BUNDLE_FILES = ("core.yaml", "eval_meta_data.csv")


def is_bundle_dir(path):
    return all(os.path.isfile(os.path.join(path, name)) for name in BUNDLE_FILES)


def _check_member_name(name):
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"unsafe path in archive: {name!r}")


def _archive_files(path):
    """(kind, member file names) of a zip or tar(.gz) archive. Reads it all, so a corrupt or
    truncated archive fails here, and refuses paths that would land outside the target folder."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                bad = zf.testzip()
                if bad is not None:
                    raise ValueError(f"member {bad} fails its CRC check")
                infos = zf.infolist()
                kind, names, files = "zip", [i.filename for i in infos], [i.filename for i in infos if not i.is_dir()]
        else:
            with tarfile.open(path, "r:*") as tf:
                members = tf.getmembers()
                kind, names, files = "tar", [m.name for m in members], [m.name for m in members if m.isfile()]
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"not a valid zip or tar.gz archive ({type(e).__name__}: {e})") from None
    for name in names:
        _check_member_name(name)
    return kind, files


def _bundle_root(files):
    """The folder inside the archive that holds core.yaml and eval_meta_data.csv (the shallowest one)."""
    roots = sorted({posixpath.dirname(n) for n in files if posixpath.basename(n) == "core.yaml"}, key=lambda r: (r.count("/"), r))
    for root in roots:
        if all(posixpath.join(root, f) in files for f in BUNDLE_FILES):
            return root
    raise ValueError(f"it has no folder holding {' and '.join(BUNDLE_FILES)}")


def download_eval_bundle(url=None, dest=None, timeout=60):
    """Download and unpack the bundle into dest (default $NANOCHAT_BASE_DIR/eval_bundle) unless it
    is already there. Unpacked next to dest and renamed into place, so dest is complete or absent."""
    url = url if url is not None else os.environ.get(EVAL_BUNDLE_URL_ENV, "").strip()
    dest = dest or os.path.join(get_base_dir(), "eval_bundle")
    if is_bundle_dir(dest):
        return dest
    if not url:
        raise RuntimeError(
            f"no CORE eval bundle at {dest} and no download URL: either pass --eval-dir=DIR pointing at an "
            f"unpacked bundle (core.yaml, eval_meta_data.csv, eval_data/...; e.g. ../shared/data/eval/core), "
            f"or set {EVAL_BUNDLE_URL_ENV} to the URL of a zip or tar.gz of that folder")
    if os.path.exists(dest):
        raise RuntimeError(f"{dest} exists but is not a CORE eval bundle (no core.yaml); remove it and retry")
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".eval_bundle-", suffix=".tmp")
    try:
        archive = os.path.join(tmp, "bundle.archive")
        print0(f"downloading the CORE eval bundle from {url}")
        try:
            download_file(url, archive, retries=2, backoff=0.5, timeout=timeout)
        except DownloadError as e:
            raise RuntimeError(f"download of the CORE eval bundle from {url} failed: {e}") from None
        try:
            kind, files = _archive_files(archive)
            root = _bundle_root(files)
        except ValueError as e:
            raise RuntimeError(f"the file downloaded from {url} is not a usable CORE eval bundle: {e}") from None
        unpacked = os.path.join(tmp, "unpacked")
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(unpacked)
        else:
            with tarfile.open(archive, "r:*") as tf:
                members = [m for m in tf.getmembers() if m.isfile() or m.isdir()]  # no links or devices
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(unpacked, members=members, **safe)
        try:
            os.replace(os.path.join(unpacked, root), dest)
        except OSError:
            if not is_bundle_dir(dest):  # else another process finished the same download first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_eval_dir(eval_dir=None):
    """An explicit bundle directory, else $NANOCHAT_BASE_DIR/eval_bundle, downloaded if needed."""
    if eval_dir:
        if not is_bundle_dir(eval_dir):
            raise FileNotFoundError(f"--eval-dir {eval_dir} is not a CORE eval bundle: it needs "
                                    f"{' and '.join(BUNDLE_FILES)} and eval_data/")
        return eval_dir
    return download_eval_bundle()
