"""
Pretraining text: where documents come from, how sources are mixed, and the reference shard download.

A data spec names one or more sources, each a directory or a file, with an optional weight:
    --data=PATH[:WEIGHT][,PATH[:WEIGHT]...]
Supported files: .parquet (a `text` column), .jsonl / .jsonl.gz (one {"text": ...} per line),
and .txt (documents separated by blank lines). Without a spec, the reference shards downloaded by
`python -m nanochat.dataset -n N` into $NANOCHAT_BASE_DIR/base_data are read.

Validation split, per source (the first rule that applies):
- the reference shards: the last shard (highest number) is validation, the others training
  (so the validation shard moves when more shards are downloaded; a single shard is split by hash);
- a directory with files whose name starts with "val": those files are validation, the rest training;
- anything else: a document is validation when crc32(its UTF-8 text) % 1000 < 10, i.e. about 1%.
  The hash is of the content, so the split is deterministic, disjoint, independent of file order
  and of the seed, and duplicate documents land on the same side.

Mixture: a weight is a source's share of the *text* (characters), not of the documents: a book and
a joke are not worth the same. The next document comes from the source furthest below its share
(smallest characters-read / weight), so shares track the weights to within one document at any
point of the stream. The seed shifts each source's starting point by up to 1,000 characters, so
seeds interleave differently. A source that runs out starts over (a new epoch), with a warning.
"""
import collections.abc
import glob
import gzip
import itertools
import json
import math
import os
import random
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from nanochat.common import get_base_dir, logger, make_parser, positive_int
from nanochat.download import DownloadError, download_file

TEXT_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".txt")
HOLDOUT_PER_MILLE = 10  # hash-split sources: 1% of documents are validation
SPLITS = ("train", "val")
BAD_LINE_POLICIES = ("skip", "fail")


class DataError(ValueError):
    """A problem with the user's data: the message says what and where."""


@dataclass
class DataSource:
    path: str
    weight: float = 1.0
    reference: bool = False  # the downloaded reference shards: last shard is validation


def parse_weighted_path(item, what="data source"):
    """'PATH:WEIGHT' -> (PATH, WEIGHT), 'PATH' -> (PATH, 1.0): one entry of --data and of the chat stages'
    --extra-data. A path that exists as written is taken whole (a ':' in its name); a weight must be a
    positive finite number. DataError (a ValueError) naming `what` otherwise."""
    head, sep, tail = item.rpartition(":")
    if not sep or not head or os.path.exists(item):
        return item, 1.0
    try:
        weight = float(tail)
    except ValueError:
        raise DataError(f"weight {tail!r} of {what} {head!r} is not a number (write PATH:WEIGHT)") from None
    if not (math.isfinite(weight) and weight > 0):
        raise DataError(f"weight of {what} {head!r} must be a positive number, got {tail!r}")
    return head, weight


def parse_data_spec(spec):
    """'a:0.45,b:0.4,c' -> [DataSource('a', 0.45), DataSource('b', 0.4), DataSource('c', 1.0)]."""
    if not spec or not spec.strip():
        raise DataError("empty data spec: expected PATH[:WEIGHT][,PATH[:WEIGHT]...]")
    items = [item.strip() for item in spec.split(",")]
    if not all(items):
        raise DataError(f"empty entry in data spec {spec!r}")
    return [DataSource(os.path.expanduser(path), weight) for path, weight in map(parse_weighted_path, items)]


def get_shard_dir():
    """Where the reference shards live: $NANOCHAT_BASE_DIR/base_data (not the task data folder,
    tasks.common.get_task_data_dir)."""
    return os.path.join(get_base_dir(), "base_data")


def is_validation_file(path):
    return os.path.basename(path).startswith("val")


def is_held_out(text):
    """The hash split of sources without validation files: about 1% of documents, by content."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) % 1000 < HOLDOUT_PER_MILLE


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
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(root, n) for n in sorted(names) if n.endswith(TEXT_SUFFIXES) and not n.startswith("."))
    if not files:
        raise DataError(f"no readable files in {path}: expected {', '.join(TEXT_SUFFIXES)} files")
    return files


def source_files(source, split):
    """(files of `source` that hold `split`, whether their documents are split by hash)."""
    if source.reference:
        files = list_reference_shards(source.path)
        if len(files) >= 2:
            return (files[:-1] if split == "train" else files[-1:]), False
        return files, True  # a single shard (DocumentMixture checked there is one): split it by hash
    files = list_text_files(source.path)
    val = [f for f in files if is_validation_file(f)] if os.path.isdir(source.path) else []
    if not val:
        return files, True
    train = [f for f in files if not is_validation_file(f)]
    if not train:
        raise DataError(f"data source {source.path} has only validation files (names starting with 'val'), "
                        "no training files")
    return (train if split == "train" else val), False

# -----------------------------------------------------------------------------
# Reading one file

def _iter_parquet(path, row_groups=None):
    """Documents of a parquet file with a string `text` column (DataError otherwise), from its first
    `row_groups` row groups (None: all)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path} is not a valid parquet file: {e}") from None
    with pf:
        schema = pf.schema_arrow
        if "text" not in schema.names:
            raise DataError(f"parquet file {path} has no 'text' column (columns: {schema.names})")
        if not (pa.types.is_string(schema.field("text").type) or pa.types.is_large_string(schema.field("text").type)):
            raise DataError(f"parquet file {path}: column 'text' holds {schema.field('text').type}, not strings")
        for i in range(pf.num_row_groups if row_groups is None else row_groups):
            try:
                texts = pf.read_row_group(i, columns=["text"]).column("text").to_pylist()
            except Exception as e:
                raise DataError(f"cannot read row group {i} of parquet file {path}: {e}")
            yield from filter(None, texts)


def _iter_jsonl(path, on_bad_line="skip"):
    opener = gzip.open if path.endswith(".gz") else open
    bad = lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                    if not isinstance(text, str):
                        raise TypeError("'text' is not a string")
                except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
                    if on_bad_line == "fail":
                        raise DataError(f"{path}:{lineno}: not a JSON object with a 'text' string ({e}); "
                                        "pass on_bad_line='skip' to skip such lines") from None
                    bad += 1
                    continue
                if text:
                    yield text
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise DataError(f"cannot read {path} (after line {lineno}): {e}") from None
    if bad:
        logger.warning(f"{path}: skipped {bad} line(s) that were not JSON objects with a 'text' string")


def _iter_txt(path):
    try:
        with open(path, encoding="utf-8") as f:
            for text, lines in itertools.groupby(f, key=lambda line: bool(line.strip())):
                if text:
                    yield "".join(lines).rstrip("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def iter_file_documents(path, on_bad_line="skip"):
    """Documents (non-empty strings) of one file of list_text_files (which checked its suffix), in file order.
    on_bad_line: "skip" or "fail" (jsonl)."""
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
    elif path.endswith((".jsonl", ".jsonl.gz")):
        yield from _iter_jsonl(path, on_bad_line)
    else:
        yield from _iter_txt(path)

# -----------------------------------------------------------------------------
# One source, epoch after epoch, with a position that can be saved and restored

class SourceReader:
    """The documents of one source and split. Position: (epoch, file index, documents read from that
    file); restoring it skips ahead within one file only."""

    def __init__(self, source, split, on_bad_line="skip"):
        self.source, self.split, self.on_bad_line = source, split, on_bad_line
        self.files, self.hash_split = source_files(source, split)
        self.names = [os.path.basename(f) for f in self.files] + [None]  # None: past the last file
        self.epoch = self.file_index = 0
        self.doc_index = 0      # documents read from files[file_index] (before the hash split)
        self.docs_in_epoch = 0  # documents of this split returned in this epoch
        self._docs = None       # open iterator over files[file_index]

    def next_document(self):
        """The next document of this epoch, or None when the epoch is over (the reader then rewinds)."""
        while self.file_index < len(self.files):
            if self._docs is None:
                self._docs = iter_file_documents(self.files[self.file_index], self.on_bad_line)
                collections.deque(itertools.islice(self._docs, self.doc_index), maxlen=0)  # resume: skip ahead
            for text in self._docs:
                self.doc_index += 1
                if self.hash_split and is_held_out(text) != (self.split == "val"):
                    continue
                self.docs_in_epoch += 1
                return text
            self._docs = None
            self.file_index += 1
            self.doc_index = 0
        if self.docs_in_epoch == 0:
            raise DataError(f"data source {self.source.path} has no documents in the {self.split} split"
                            + (" (its hash-held-out 1% is empty: add a val* file)" if self.hash_split and self.split == "val" else ""))
        self.epoch += 1
        self.file_index = self.doc_index = self.docs_in_epoch = 0
        return None

    def state_dict(self):
        return {"path": self.source.path, "file": self.names[self.file_index], "epoch": self.epoch,
                "file_index": self.file_index, "doc_index": self.doc_index, "docs_in_epoch": self.docs_in_epoch}

    def load_state_dict(self, state):
        if state["file_index"] >= len(self.names) or self.names[state["file_index"]] != state["file"]:
            raise DataError(f"cannot restore the position in data source {self.source.path}: it was in file "
                            f"{state['file']!r} (number {state['file_index']}), which is not there any more")
        if self._docs is not None:
            self._docs.close()
        self._docs = None
        self.epoch, self.file_index = state["epoch"], state["file_index"]
        self.doc_index, self.docs_in_epoch = state["doc_index"], state["docs_in_epoch"]

# -----------------------------------------------------------------------------
# The weighted mixture of sources

class DocumentMixture(collections.abc.Iterator):
    """An iterator of documents (str) over the sources of `spec` (None: the reference shards), each source's
    share of the text following its weight (see the module docstring). infinite=False is one pass over each
    source (tokenizer training). Paths, weights and the split are checked here (DataError); a file's contents
    (a parquet without `text`, a bad jsonl line with on_bad_line="fail") when it is read."""

    def __init__(self, spec=None, split="train", seed=0, infinite=True, on_bad_line="skip"):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        if on_bad_line not in BAD_LINE_POLICIES:
            raise DataError(f"on_bad_line must be one of {BAD_LINE_POLICIES}, got {on_bad_line!r}")
        if spec is None and not list_reference_shards(get_shard_dir()):
            raise DataError(f"no pretraining data: {get_shard_dir()} holds no shards. Download the reference shards "
                            "with `python -m nanochat.dataset -n 8` (more for longer runs), or pass your own with "
                            "--data=PATH")
        self.sources = parse_data_spec(spec) if spec is not None else [DataSource(get_shard_dir(), reference=True)]
        self.readers = [SourceReader(s, split, on_bad_line) for s in self.sources]
        self.split, self.infinite = split, infinite
        total = sum(s.weight for s in self.sources)
        self.shares = [s.weight / total for s in self.sources]
        rng = random.Random(seed)
        self.passes = [rng.random() * 1000 / share for share in self.shares]  # characters read / share
        self.done = [False] * len(self.sources)  # one-pass mode: sources that are finished
        self.index = 0  # documents returned so far: the position in the global stream

    def __next__(self):
        while True:
            live = [i for i, done in enumerate(self.done) if not done]
            if not live:
                raise StopIteration
            i = min(live, key=lambda j: (self.passes[j], j))
            text = self.readers[i].next_document()
            if text is not None:
                self.passes[i] += len(text) / self.shares[i]
                self.index += 1
                return text
            if not self.infinite:
                self.done[i] = True
                continue
            epochs = ", ".join(f"{s.path} {r.epoch + 1}" for s, r in zip(self.sources, self.readers))
            logger.warning(f"data source {self.sources[i].path} ({self.split}) ran out and starts epoch "
                           f"{self.readers[i].epoch + 1}; epochs started per source: {epochs}")

    def state_dict(self):
        """Small and JSON-serialisable: restoring it continues the stream exactly."""
        return {"split": self.split, "index": self.index, "passes": list(self.passes), "done": list(self.done),
                "sources": [r.state_dict() for r in self.readers]}

    def load_state_dict(self, state):
        saved = [s["path"] for s in state["sources"]]
        current = [s.path for s in self.sources]
        if saved != current or state["split"] != self.split:
            raise DataError(f"data state was saved for sources {saved} ({state['split']} split), "
                            f"not for {current} ({self.split} split)")
        for reader, s in zip(self.readers, state["sources"]):
            reader.load_state_dict(s)
        self.index = state["index"]
        self.passes = list(state["passes"])
        self.done = list(state["done"])


iter_documents = DocumentMixture  # the name the scripts use

# -----------------------------------------------------------------------------
# Reference shards: parallel downloads through download.download_file (retries, validation, atomic rename)

DEFAULT_DATA_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"


def shard_name(index):
    return f"shard_{index:05d}.parquet"


def list_reference_shards(data_dir):
    return sorted(glob.glob(os.path.join(glob.escape(data_dir), "shard_*.parquet")))


def check_parquet(path, full=False):
    """Raise DataError unless `path` is a parquet file with a string `text` column. full=True also
    decodes every row group (catches corruption inside the file, not only a bad footer)."""
    collections.deque(_iter_parquet(path, row_groups=None if full else 0), maxlen=0)


def download_shard(index, base_url, data_dir, retries, backoff, timeout):
    """Fetch one shard unless a valid copy is there. Returns 'skipped' or 'downloaded'; raises DataError.
    `retries` counts attempts, the first included. The transfer is download.download_file's: atomic, and
    a truncated or corrupt file (every row group is decoded before the rename) is fetched again."""
    name = shard_name(index)
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
        try:
            check_parquet(path)
            return "skipped"
        except DataError as e:
            logger.warning(f"{e}; removing it and downloading {name} again")
            os.remove(path)
    url = f"{base_url.rstrip('/')}/{name}"
    try:
        download_file(url, path, validate=lambda tmp: check_parquet(tmp, full=True), retries=retries - 1,
                      backoff=backoff, timeout=timeout, refetch_invalid=True)
    except DownloadError as e:
        if e.status == 404:
            raise DataError(f"shard {name} not found (HTTP 404) at {url}: the data set at {base_url} may have "
                            f"fewer shards than requested; check -n and NANOCHAT_DATA_URL") from None
        reason = str(e).removeprefix(f"{url}: ")
        raise DataError(f"could not download shard {name} from {url} after {e.attempts} "
                        f"attempt{'s' if e.attempts > 1 else ''}: {reason}") from None
    return "downloaded"


def download_shards(num_shards, workers=4, base_url=None, data_dir=None, retries=5, backoff=2.0, timeout=60):
    """Make shard_00000 .. shard_{num_shards-1} present and valid in data_dir. Returns their paths.
    Raises DataError naming every shard that failed."""
    base_url = base_url or os.environ.get("NANOCHAT_DATA_URL") or DEFAULT_DATA_URL
    data_dir = data_dir or get_shard_dir()
    os.makedirs(data_dir, exist_ok=True)
    # temp files of a killed download (a live one is written to every second; .tmp: the name before
    # downloads went through download_file)
    for tmp in glob.glob(os.path.join(glob.escape(data_dir), "shard_*")):
        try:
            if tmp.endswith((".part", ".tmp")) and time.time() - os.path.getmtime(tmp) > 3600:
                os.remove(tmp)
        except OSError:
            pass  # another downloader got there first
    tty, errors = sys.stdout.isatty(), {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(download_shard, i, base_url, data_dir, retries, backoff, timeout): i for i in range(num_shards)}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            try:
                outcome = future.result()
            except DataError as e:
                errors[i], outcome = str(e), "FAILED"
            if tty:  # a one-line bar on a terminal, one line per shard otherwise (logs stay readable)
                bar = "#" * (30 * done // num_shards)
                print(f"\r[{bar:.<30}] {done}/{num_shards} shards", end="\n" if done == num_shards else "", flush=True)
            else:
                print(f"[{done}/{num_shards}] {shard_name(i)} {outcome}", flush=True)
    if errors:
        raise DataError(f"{len(errors)} of {num_shards} shard(s) failed:\n" + "\n".join(errors[i] for i in sorted(errors)))
    return [os.path.join(data_dir, shard_name(i)) for i in range(num_shards)]


def main(argv=None):
    parser = make_parser("Download the reference pretraining shards (FineWeb-EDU, parquet) into "
                         "$NANOCHAT_BASE_DIR/base_data. The URL comes from $NANOCHAT_DATA_URL "
                         f"(default {DEFAULT_DATA_URL}).")
    parser.add_argument("-n", "--num-shards", type=positive_int, required=True, help="download shards 0 .. N-1")
    parser.add_argument("-w", "--workers", type=positive_int, default=4, help="parallel downloads")
    parser.add_argument("--retries", type=positive_int, default=5, help="attempts per shard")
    args = parser.parse_args(argv)
    try:
        paths = download_shards(args.num_shards, workers=args.workers, retries=args.retries)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(paths)} shard(s) ready in {get_shard_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
