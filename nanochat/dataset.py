"""
Pretraining text: where documents come from and how they are read.

A data spec names one or more sources, each a directory or a file, with an optional weight:
    --data=PATH[:WEIGHT][,PATH[:WEIGHT]...]
Supported files: .parquet (a `text` column), .jsonl / .jsonl.gz (one {"text": ...} per line),
and .txt (documents separated by blank lines). Files whose name starts with "val" hold the
validation split of their source.
"""
import gzip
import json
import os
from dataclasses import dataclass

from nanochat.common import logger

TEXT_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")


class DataError(ValueError):
    """A problem with the user's data: the message says what and where."""


@dataclass
class DataSource:
    path: str
    weight: float = 1.0


def parse_data_spec(spec):
    """'a:0.45,b:0.4,c' -> [DataSource('a', 0.45), DataSource('b', 0.4), DataSource('c', 1.0)]."""
    if not spec or not spec.strip():
        raise DataError("empty data spec: expected PATH[:WEIGHT][,PATH[:WEIGHT]...]")
    sources = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise DataError(f"empty entry in data spec {spec!r}")
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head and not os.path.exists(item):
            try:
                weight = float(tail)
            except ValueError:
                raise DataError(f"weight {tail!r} of data source {head!r} is not a number")
            path = head
            if not weight > 0 or weight == float("inf"):
                raise DataError(f"weight of data source {path!r} must be a positive number, got {tail!r}")
        sources.append(DataSource(os.path.expanduser(path), weight))
    return sources


def is_validation_file(path):
    return os.path.basename(path).startswith("val")


def list_text_files(path):
    """The readable text files of a source (a file, or a directory searched recursively), sorted."""
    if not os.path.exists(path):
        raise DataError(f"data path does not exist: {path}")
    if os.path.isfile(path):
        if not path.endswith(TEXT_SUFFIXES):
            raise DataError(f"unsupported data file {path}: expected one of {', '.join(TEXT_SUFFIXES)}")
        return [path]
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(TEXT_SUFFIXES) and not n.startswith("."))
    if not files:
        raise DataError(f"no readable files in {path}: expected {', '.join(TEXT_SUFFIXES)} files")
    return files


def _iter_parquet(path):
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"cannot read parquet file {path}: {e}")
    if "text" not in pf.schema_arrow.names:
        raise DataError(f"parquet file {path} has no 'text' column (columns: {pf.schema_arrow.names})")
    for i in range(pf.num_row_groups):
        for text in pf.read_row_group(i, columns=["text"]).column("text").to_pylist():
            if text:
                yield text


def _iter_jsonl(path, on_bad_line="skip"):
    opener = gzip.open if path.endswith(".gz") else open
    bad = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if not isinstance(text, str):
                    raise TypeError("'text' is not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if on_bad_line == "fail":
                    raise DataError(f"{path}:{lineno}: not a JSON object with a 'text' string ({e})")
                bad += 1
                continue
            if text:
                yield text
    if bad:
        logger.warning(f"{path}: skipped {bad} line(s) that were not JSON objects with a 'text' string")


def _iter_txt(path):
    with open(path, encoding="utf-8") as f:
        paragraph = []
        for line in f:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\n")


def iter_file_documents(path, on_bad_line="skip"):
    """Documents (strings) of one file, in file order."""
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif path.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(path, on_bad_line)
    elif path.endswith(".txt"):
        yield from _iter_txt(path)
    else:
        raise DataError(f"unsupported data file {path}")
