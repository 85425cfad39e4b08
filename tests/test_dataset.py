"""Data sources, splits, the weighted mixture, bad input, and the shard downloader (against 127.0.0.1)."""
import gzip
import http.server
import json
import logging
import os
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import require_shared_data
from nanochat import dataset
from nanochat.dataset import DataError, DataSource, iter_documents, parse_data_spec


def write_jsonl(path, texts, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")


def write_parquet(path, texts, row_group_size=50):
    pq.write_table(pa.table({"text": texts}), path, row_group_size=row_group_size)


def make_source(root, name, n_docs, doc_len, n_files=2, val_docs=0):
    """A directory source of jsonl files; documents are 'name-i ' padded to doc_len characters."""
    d = root / name
    d.mkdir()
    docs = [(f"{name}-{i} " + "x" * doc_len)[:max(doc_len, len(f"{name}-{i}"))] for i in range(n_docs)]
    per = -(-n_docs // n_files)
    for k in range(n_files):
        write_jsonl(d / f"shard_{k:05d}.jsonl", docs[k * per:(k + 1) * per])
    if val_docs:
        write_jsonl(d / "val_00000.jsonl", [f"{name}-val-{i}" for i in range(val_docs)])
    return str(d), docs

# -----------------------------------------------------------------------------
# Specs, readers and splits

def test_parse_data_spec_weights_and_errors(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert parse_data_spec(f"{a}:0.45,{b}") == [DataSource(str(a), 0.45), DataSource(str(b), 1.0)]
    for bad, msg in [(f"{a}:0", "positive"), (f"{a}:-1", "positive"), (f"{a}:nan", "positive"),
                     (f"{a}:inf", "positive"), (f"{a}:abc", "not a number"), (f"{a},,{b}", "empty entry"), ("  ", "empty data spec")]:
        with pytest.raises(DataError, match=msg):
            parse_data_spec(bad)
    # one entry, as --data and the chat stages' --extra-data write it: a path with ':' in its name stays whole
    colon = tmp_path / "c:1"
    colon.mkdir()
    assert dataset.parse_weighted_path(str(colon)) == (str(colon), 1.0)
    assert dataset.parse_weighted_path(f"{colon}:2", "--extra-data entry") == (str(colon), 2.0)
    with pytest.raises(DataError, match=r"weight 'abc' of --extra-data entry 'x' is not a number \(write PATH:WEIGHT\)"):
        dataset.parse_weighted_path("x:abc", "--extra-data entry")


def test_readers_all_formats(tmp_path):
    write_parquet(tmp_path / "a.parquet", ["p1", "", "p2"])
    write_jsonl(tmp_path / "b.jsonl", ["j1", "j2"])
    write_jsonl(tmp_path / "c.jsonl.gz", ["g1"], gz=True)
    (tmp_path / "d.txt").write_text("para one\nline two\n\n\npara two\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x")
    files = dataset.list_text_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["a.parquet", "b.jsonl", "c.jsonl.gz", "d.txt"]
    docs = [d for f in files for d in dataset.iter_file_documents(f)]
    assert docs == ["p1", "p2", "j1", "j2", "g1", "para one\nline two", "para two"]


def test_bad_inputs_give_clear_messages(tmp_path, caplog):
    with pytest.raises(DataError, match="does not exist: .*nope"):
        iter_documents(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("hi")
    with pytest.raises(DataError, match="no readable files in .*empty"):
        iter_documents(str(tmp_path / "empty"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext.parquet")
    with pytest.raises(DataError, match="no 'text' column.*body"):
        next(iter_documents(str(tmp_path / "notext.parquet")))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="not strings"):
        next(iter_documents(str(tmp_path / "ints.parquet")))
    with pytest.raises(DataError, match="weight of data source .* positive"):
        iter_documents(f"{tmp_path / 'empty'}:-0.5")
    with pytest.raises(DataError, match="split must be one of"):
        iter_documents(str(tmp_path / "ints.parquet"), split="test")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good one"}\nnot json at all\n{"nottext": 1}\n["list"]\n{"text": "good two"}\n')
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        docs = list(dataset.iter_file_documents(str(bad), on_bad_line="skip"))
    assert docs == ["good one", "good two"]
    assert "skipped 3 line(s)" in caplog.text and "bad.jsonl" in caplog.text
    with pytest.raises(DataError, match=r"bad.jsonl:2: not a JSON object"):
        list(iter_documents(str(bad), on_bad_line="fail", infinite=False))
    with pytest.raises(DataError, match="on_bad_line"):
        iter_documents(str(bad), on_bad_line="ignore")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match="cannot read .*broken.jsonl.gz"):
        next(iter_documents(str(tmp_path / "broken.jsonl.gz")))


def test_no_spec_without_shards_says_how_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"python -m nanochat.dataset -n"):
        iter_documents(None)


def test_validation_files_and_hash_holdout(tmp_path):
    src, docs = make_source(tmp_path, "w", 40, 10, val_docs=5)
    assert set(iter_documents(src, split="val", infinite=False)) == {f"w-val-{i}" for i in range(5)}
    assert sorted(iter_documents(src, split="train", infinite=False)) == sorted(docs)
    # A source without val files holds out ~1% by content hash: disjoint, complete, deterministic.
    texts = [f"document number {i}" for i in range(3000)]
    write_jsonl(tmp_path / "all.jsonl", texts)
    train = list(iter_documents(str(tmp_path / "all.jsonl"), split="train", infinite=False))
    val = list(iter_documents(str(tmp_path / "all.jsonl"), split="val", infinite=False))
    assert not set(train) & set(val) and sorted(train + val) == sorted(texts)
    assert 10 <= len(val) <= 60  # ~1% of 3000
    assert val == [t for t in texts if dataset.is_held_out(t)]
    # only val files: no training split
    (tmp_path / "onlyval").mkdir()
    write_jsonl(tmp_path / "onlyval" / "val.jsonl", ["v"])
    with pytest.raises(DataError, match="only validation files"):
        iter_documents(str(tmp_path / "onlyval"))


def test_reference_shards_last_is_validation(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    data_dir = tmp_path / "base_data"
    data_dir.mkdir()
    for i in range(3):
        write_parquet(data_dir / dataset.shard_name(i), [f"s{i}-{j}" for j in range(4)])
    (data_dir / "shard_00003.parquet.123.part").write_bytes(b"partial download")  # never read
    (data_dir / "shard_00004.parquet.123.tmp").write_bytes(b"partial download")  # (older temp name)
    assert list(iter_documents(None, split="val", infinite=False)) == [f"s2-{j}" for j in range(4)]
    assert len(list(iter_documents(None, split="train", infinite=False))) == 8

# -----------------------------------------------------------------------------
# The mixture

def test_mixture_proportions_follow_weights_over_10k_documents(tmp_path):
    # Very different document lengths: the weights are shares of the text, so characters are what
    # must match the weights.
    a, _ = make_source(tmp_path, "a", 3000, 400)
    b, _ = make_source(tmp_path, "b", 300, 5000)
    c, _ = make_source(tmp_path, "c", 8000, 60)
    weights = {"a": 0.45, "b": 0.40, "c": 0.15}
    chars = dict.fromkeys(weights, 0)
    for text in _take(iter_documents(f"{a}:0.45,{b}:0.40,{c}:0.15", seed=3), 10_000):
        chars[text.split("-")[0]] += len(text)
    total = sum(chars.values())
    for name, w in weights.items():
        assert abs(chars[name] / total - w) < 0.02, (name, chars[name] / total)
    # Equal-length documents: the document counts follow the weights too.
    d, _ = make_source(tmp_path, "d", 2000, 100)
    e, _ = make_source(tmp_path, "e", 2000, 100)
    counts = {"d": 0, "e": 0}
    for text in _take(iter_documents(f"{d}:3,{e}:1", seed=0), 10_000):
        counts[text.split("-")[0]] += 1
    assert abs(counts["d"] / 10_000 - 0.75) < 0.02


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_mixture_is_deterministic_for_a_seed_and_epochs_are_logged(tmp_path, caplog):
    a, _ = make_source(tmp_path, "a", 50, 30)
    b, _ = make_source(tmp_path, "b", 7, 200)
    spec = f"{a}:1,{b}:1"
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        first = _take(iter_documents(spec, seed=1), 400)
    assert first == _take(iter_documents(spec, seed=1), 400)
    assert first != _take(iter_documents(spec, seed=2), 400)
    assert sorted(set(first)) == sorted(set(_take(iter_documents(spec, seed=2), 400)))
    assert "ran out and starts epoch 2" in caplog.text
    assert f"epochs started per source: {a} " in caplog.text and f"{b} " in caplog.text


def test_one_pass_reads_every_document_once(tmp_path):
    a, da = make_source(tmp_path, "a", 120, 30, n_files=3)
    b, db = make_source(tmp_path, "b", 9, 500)
    docs = list(iter_documents(f"{a}:0.9,{b}:0.1", infinite=False))
    assert sorted(docs) == sorted(da + db)


def test_mixture_state_restores_exactly(tmp_path):
    a, _ = make_source(tmp_path, "a", 40, 30, n_files=3)
    b, _ = make_source(tmp_path, "b", 9, 200)
    spec = f"{a}:2,{b}:1"
    reference = _take(iter_documents(spec, seed=5), 300)
    for k in (0, 1, 17, 120, 250):
        it = iter_documents(spec, seed=5)
        _take(it, k)
        state = json.loads(json.dumps(it.state_dict()))
        resumed = iter_documents(spec, seed=5)
        resumed.load_state_dict(state)
        assert _take(resumed, 300 - k) == reference[k:]
    other = iter_documents(a)
    with pytest.raises(DataError, match="saved for sources"):
        other.load_state_dict(state)
    # The file a source was reading has gone: a clear error, not a silently different stream.
    it = iter_documents(spec, seed=5)
    _take(it, 30)
    state = it.state_dict()
    gone = os.path.join(a, state["sources"][0]["file"])
    os.rename(gone, gone + ".moved")
    with pytest.raises(DataError, match="not there any more"):
        iter_documents(spec, seed=5).load_state_dict(state)


def test_first_users_mix_over_shared_data():
    root = require_shared_data("pretrain")
    spec = ",".join(f"{os.path.join(root, s)}:{w}" for s, w in (("wikipedia", 0.45), ("books", 0.40), ("reddit", 0.15)))
    seen = {"wikipedia": 0, "books": 0, "reddit": 0}
    it = iter_documents(spec, seed=0)
    for src_index in range(300):
        next(it)
    for reader, name in zip(it.readers, seen):
        seen[name] = reader.docs_in_epoch
        assert all(not dataset.is_validation_file(f) for f in reader.files)
    assert all(n > 0 for n in seen.values()), seen
    val = iter_documents(spec, split="val")
    assert all(dataset.is_validation_file(f) for r in val.readers for f in r.files)
    assert next(val)

# -----------------------------------------------------------------------------
# The downloader, against a local http.server

class ShardServer:
    """Serves {name: bytes} on 127.0.0.1. `plan[name]` is a list of per-request behaviours
    ('ok', 'truncate', 'corrupt', '500'), used up in order, then 'ok'. Unknown names get 404."""

    def __init__(self, files):
        self.files, self.plan, self.requests = files, {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                server.requests.append(name)
                if name not in server.files:
                    self.send_error(404)
                    return
                steps = server.plan.get(name) or ["ok"]
                action = steps.pop(0) if server.plan.get(name) else "ok"
                body = server.files[name]
                if action == "500":
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action == "truncate":  # promise the full length, send half, hang up
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                elif action == "corrupt":
                    self.wfile.write(b"PAR1" + bytes(len(body) - 4))
                else:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def shard_server(tmp_path):
    files = {}
    for i in range(4):
        path = tmp_path / f"src_{i}.parquet"
        write_parquet(path, [f"shard {i} doc {j} " * 20 for j in range(200)])
        files[dataset.shard_name(i)] = path.read_bytes()
    server = ShardServer(files)
    yield server
    server.close()


def _download(server, out, n, **kw):
    return dataset.download_shards(n, workers=2, base_url=server.url, data_dir=str(out), backoff=0.01, timeout=10, **kw)


def test_download_normal_then_rerun_skips(shard_server, tmp_path, capsys):
    out = tmp_path / "base_data"
    paths = _download(shard_server, out, 3)
    assert [os.path.basename(p) for p in paths] == [dataset.shard_name(i) for i in range(3)]
    for i, p in enumerate(paths):
        assert open(p, "rb").read() == shard_server.files[dataset.shard_name(i)]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)  # no temp files left
    assert "[3/3]" in capsys.readouterr().out
    shard_server.requests.clear()
    _download(shard_server, out, 4)
    assert shard_server.requests == [dataset.shard_name(3)]  # complete shards are not fetched again


def test_download_retries_interrupted_and_corrupt_transfers(shard_server, tmp_path, caplog):
    out = tmp_path / "base_data"
    name0, name1 = dataset.shard_name(0), dataset.shard_name(1)
    shard_server.plan = {name0: ["truncate", "500"], name1: ["corrupt"]}
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        _download(shard_server, out, 2)
    assert shard_server.requests.count(name0) == 3 and shard_server.requests.count(name1) == 2
    assert "transfer interrupted" in caplog.text and "HTTP 500" in caplog.text and "not a valid parquet" in caplog.text
    for name in (name0, name1):
        assert (out / name).read_bytes() == shard_server.files[name]
    # A server that always sends a corrupt file: the shard is never renamed into place.
    shard_server.plan = {dataset.shard_name(2): ["corrupt"] * 3}
    with pytest.raises(DataError, match=r"shard_00002.parquet .*after 3 attempts"):
        _download(shard_server, out, 3, retries=3)
    assert not (out / dataset.shard_name(2)).exists()
    assert not [n for n in os.listdir(out) if n.endswith((".part", ".tmp"))]


def test_download_replaces_a_corrupt_local_shard(shard_server, tmp_path):
    out = tmp_path / "base_data"
    out.mkdir()
    name = dataset.shard_name(0)
    (out / name).write_bytes(shard_server.files[name][:1000])  # truncated copy from some earlier run
    _download(shard_server, out, 1)
    assert (out / name).read_bytes() == shard_server.files[name]
    assert shard_server.requests == [name]


def test_download_404_names_the_shard(shard_server, tmp_path, monkeypatch, capsys):
    out = tmp_path / "base"
    with pytest.raises(DataError, match=r"shard_00005.parquet not found \(HTTP 404\)") as e:
        _download(shard_server, out / "base_data", 6)
    assert "shard_00004" in str(e.value) and "2 of 6 shard(s) failed" in str(e.value)
    assert shard_server.requests.count(dataset.shard_name(5)) == 1  # a 404 is not retried
    # The command line prints the message, no traceback, and exits 1.
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(out))
    monkeypatch.setenv("NANOCHAT_DATA_URL", shard_server.url)
    assert dataset.main(["-n", "5", "-w", "2", "--retries", "1"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "shard_00004.parquet not found" in err and "Traceback" not in err
    assert dataset.main(["-n", "2"]) == 0
    # shards 0-3 are there (the failed run kept the good ones): the last is the validation split
    assert list(iter_documents(None, split="val", infinite=False))[0].startswith("shard 3 doc 0")
