"""
The CORE evaluation bundle: which tasks there are, their data, and where the bundle comes from.

A bundle is a folder holding
    core.yaml              the `icl_tasks:` list: label, dataset_uri, icl_task_type, num_fewshot, ...
    eval_meta_data.csv     one row per task; its 'Random baseline' column (in percent) centers the accuracy
    eval_data/<uri>.jsonl  the items of each task
It is read from --eval-dir, or from $NANOCHAT_BASE_DIR/eval_bundle, downloaded once (a zip or tar.gz of
that folder) from $NANOCHAT_EVAL_BUNDLE_URL. Scoring the tasks is nanochat/core_eval.py's job.
"""
import csv
import os
import re
import tarfile
import tempfile
import zipfile
import zlib
from dataclasses import dataclass

import torch.distributed as dist
import yaml

from nanochat.common import dist_rank_world, get_base_dir, print0, read_jsonl
from nanochat.download import DownloadError, download_file

REQUIRED_FIELDS = {  # the fields an item of each task type needs
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}
TASK_TYPES = tuple(REQUIRED_FIELDS)
EVAL_BUNDLE_URL_ENV = "NANOCHAT_EVAL_BUNDLE_URL"
BUNDLE_FILES = ("core.yaml", "eval_meta_data.csv")


@dataclass
class CoreTask:
    label: str
    dataset_uri: str            # relative to <eval_dir>/eval_data/
    task_type: str              # one of TASK_TYPES
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float      # in percent, as in eval_meta_data.csv

# -----------------------------------------------------------------------------
# core.yaml and eval_meta_data.csv


def parse_core_yaml(text, source="core.yaml"):
    """The `icl_tasks:` list of core.yaml as a list of dicts, read by PyYAML (safe loader). The file must be a
    top-level `icl_tasks:` list of flat mappings whose values are scalars or one-line [lists], as the
    published bundles are; anything else, a repeated key (which YAML would silently let win) or a YAML syntax
    error is a ValueError naming source:line, rather than a silent misread."""
    def at(node):
        return f"{source}:{node.start_mark.line + 1}"

    for lineno, raw in enumerate(text.splitlines(), 1):  # YAML's own message for this is cryptic
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"{source}:{lineno}: tabs are not allowed in YAML indentation")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if not isinstance(root, yaml.MappingNode):
            raise ValueError(f"{source}: no `icl_tasks:` list found")
        tasks_node = None
        for key, value in root.value:
            if key.value != "icl_tasks":
                raise ValueError(f"{at(key)}: expected the top-level key `icl_tasks:`, got {key.value!r}")
            tasks_node = value
        if isinstance(tasks_node, yaml.ScalarNode) and tasks_node.tag.endswith(":null"):
            return []  # `icl_tasks:` with no items
        if not isinstance(tasks_node, yaml.SequenceNode):
            raise ValueError(f"{at(tasks_node)}: `icl_tasks:` must be a list of `-` items")
        for item in tasks_node.value:
            if not isinstance(item, yaml.MappingNode):
                raise ValueError(f"{at(item)}: expected a `-` list item of `key: value` lines")
            seen = set()
            for key, value in item.value:
                if key.value in seen:
                    raise ValueError(f"{at(key)}: duplicate key {key.value!r}")
                seen.add(key.value)
                flat_list = (isinstance(value, yaml.SequenceNode) and value.flow_style
                             and all(isinstance(v, yaml.ScalarNode) for v in value.value))
                if not isinstance(value, yaml.ScalarNode) and not flat_list:
                    raise ValueError(f"{at(key)}: nested blocks are not supported here, expected `key: value` "
                                     "with a scalar or a one-line [list]")
        return yaml.safe_load(text)["icl_tasks"]  # checked above, now built
    except yaml.YAMLError as e:
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        why = "; ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise ValueError(f"{where}: cannot parse the YAML ({why})") from None


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
    if isinstance(shots, list) and shots:
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
    check_bundle_dir(eval_dir)
    yaml_path, meta_path = (os.path.join(eval_dir, name) for name in BUNDLE_FILES)
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


def _validate_item(item, task_type):
    """True for a usable item of `task_type`; ValueError saying what is wrong otherwise."""
    if not isinstance(item, dict):
        raise ValueError("expected a JSON object")
    for key in REQUIRED_FIELDS[task_type]:
        if key not in item:
            raise ValueError(f"a {task_type} item needs {REQUIRED_FIELDS[task_type]}, {key!r} is missing")
    options = item.get("choices", item.get("context_options"))
    if options is not None:
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise ValueError(f"expected a list of at least two strings, got {options!r}")
        gold = item["gold"]
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
            raise ValueError(f"gold {gold!r} is not an index into its {len(options)} options")
    if "continuation" in item and not isinstance(item["continuation"], str):
        raise ValueError("continuation must be a string")
    return True


def load_task_items(eval_dir, task):
    """The validated rows of one task's JSONL file."""
    path = os.path.join(eval_dir, "eval_data", task.dataset_uri)
    items = read_jsonl(path, lambda item: _validate_item(item, task.task_type))
    if not items:
        raise ValueError(f"{path}: no items")
    return items

# -----------------------------------------------------------------------------
# Getting the bundle: a local directory, or a one-time download of a zip / tar.gz archive


def is_bundle_dir(path):
    return all(os.path.isfile(os.path.join(path, name)) for name in BUNDLE_FILES)


def check_bundle_dir(path):
    """path, when it holds a bundle; else a FileNotFoundError saying what a bundle is."""
    if not is_bundle_dir(path):
        raise FileNotFoundError(f"{path} is not a CORE eval bundle: it needs {', '.join(BUNDLE_FILES)} and eval_data/")
    return path


def _check_member_names(names):
    for name in names:
        if name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/") or re.match(r"^[A-Za-z]:", name):
            raise ValueError(f"unsafe path in archive: {name!r}")


def _unpack_bundle(archive, dest):
    """Unpack a zip or tar(.gz) archive into dest; return the shallowest folder in it holding the bundle files.
    Every member is read and CRC-checked, so a corrupt or truncated archive fails here (ValueError), as does a
    path that would land outside dest. Tar links and devices are left out."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                _check_member_names(zf.namelist())
                zf.extractall(dest)
        else:
            with tarfile.open(archive, "r:*") as tf:
                _check_member_names(tf.getnames())
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12 / 3.11.4
                tf.extractall(dest, members=[m for m in tf if m.isfile() or m.isdir()], **safe)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"not a valid zip or tar.gz archive ({type(e).__name__}: {e})") from None
    roots = [folder for folder, _, _ in os.walk(dest) if is_bundle_dir(folder)]
    if not roots:
        raise ValueError(f"it has no folder holding {' and '.join(BUNDLE_FILES)}")
    return min(roots, key=lambda folder: (folder.count(os.sep), folder))


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
    with tempfile.TemporaryDirectory(dir=parent, prefix=".eval_bundle-", suffix=".tmp",
                                     ignore_cleanup_errors=True) as tmp:
        archive = os.path.join(tmp, "bundle.archive")
        print0(f"downloading the CORE eval bundle from {url}")
        try:
            download_file(url, archive, retries=2, backoff=0.5, timeout=timeout)
            root = _unpack_bundle(archive, os.path.join(tmp, "unpacked"))
        except DownloadError as e:
            raise RuntimeError(f"download of the CORE eval bundle from {url} failed: {e}") from None
        except ValueError as e:  # from unpacking
            raise RuntimeError(f"the file downloaded from {url} is not a usable CORE eval bundle: {e}") from None
        try:
            os.replace(root, dest)
        except OSError:
            if not is_bundle_dir(dest):  # else another process finished the same download first
                raise
    return dest


def resolve_eval_dir(eval_dir=None):
    """An explicit bundle directory, else $NANOCHAT_BASE_DIR/eval_bundle, downloaded if needed. Under torchrun
    rank 0 goes first (it may download) while the others wait, then find the bundle in place."""
    rank, world_size = dist_rank_world()
    if world_size > 1 and rank > 0:
        dist.barrier()
    path = check_bundle_dir(eval_dir) if eval_dir else download_eval_bundle()
    if world_size > 1 and rank == 0:
        dist.barrier()
    return path
