"""The task library: the common base, each task on the shared data, and the downloader."""
import csv
import gzip
import http.server
import json
import os
import threading

import pytest

from conftest import require_shared_data
from tasks.common import (Task, content_text, data_path, get_task_data_dir, mc_conversation, render_mc,
                          validate_conversation)

# -----------------------------------------------------------------------------
# common


class Numbers(Task):
    """Example i is a conversation whose user message is str(i)."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": str(index)}, {"role": "assistant", "content": "ok"}]}


def ids(task):
    return [int(c["messages"][0]["content"]) for c in task]


def test_task_slicing_and_shuffling():
    assert ids(Numbers(10)) == list(range(10))
    assert ids(Numbers(10, start=2, stop=8, step=2)) == [2, 4, 6]
    t = Numbers(10)
    assert len(t) == 10 and ids([t[-1]]) == [9]
    with pytest.raises(IndexError):
        t[10]
    a, b = ids(Numbers(50, seed=1)), ids(Numbers(50, seed=1))
    assert a == b and sorted(a) == list(range(50)) and a != list(range(50))
    assert ids(Numbers(50, seed=2)) != a
    assert ids(Numbers(50, seed=1, stop=5)) == a[:5]  # shuffle first, then slice
    with pytest.raises(ValueError):
        Numbers(5, step=0)
    with pytest.raises(NotImplementedError):
        Numbers(3).evaluate(Numbers(3)[0], "x")


def test_render_mc_and_mc_conversation():
    text = render_mc("What is 2+2?", ["3", "4", "5", "22"])
    assert text.splitlines()[0] == "What is 2+2?"
    assert "A. 3" in text and "B. 4" in text and "D. 22" in text
    assert "A, B, C or D" in text
    conv = mc_conversation("What is 2+2?", ["3", "4", "5", "22"], 1)
    assert conv["letters"] == ["A", "B", "C", "D"] and conv["messages"][-1]["content"] == "B"
    validate_conversation(conv)
    with pytest.raises(ValueError):
        mc_conversation("q", ["a", "b"], 2)


def test_validate_conversation():
    ok = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                       {"role": "assistant", "content": [{"type": "text", "text": "t"},
                                                         {"type": "python", "text": "1+1"},
                                                         {"type": "python_output", "text": "2"}]}]}
    validate_conversation(ok)
    assert content_text(ok["messages"][2]["content"]) == "t1+12"
    bad = [{"messages": []}, {"messages": [{"role": "assistant", "content": "a"}]},
           {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
           {"messages": [{"role": "robot", "content": "a"}]}, {"messages": [{"role": "user", "content": ""}]},
           {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
           {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "bash", "text": "x"}]}]},
           {"messages": [{"role": "system", "content": "s"}]}, {"conversation": []}]
    for conv in bad:
        with pytest.raises(ValueError):
            validate_conversation(conv)


def test_data_dir_and_missing_data(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))
    assert get_task_data_dir() == str(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        data_path("eval", "gsm8k", "test.jsonl", what="GSM8K test data")
    message = str(e.value)
    assert str(tmp_path / "eval" / "gsm8k" / "test.jsonl") in message and "NANOCHAT_DATA_DIR" in message
    from tasks.gsm8k import GSM8K
    with pytest.raises(FileNotFoundError, match="tasks.download"):
        GSM8K(split="test")
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    assert get_task_data_dir().endswith(os.path.join("shared", "data"))

# -----------------------------------------------------------------------------
# ARC and MMLU: letters map to the gold index


def _check_mc(conv, question, choices, gold):
    user = conv["messages"][0]["content"]
    assert user.startswith(question.strip())
    for letter, choice in zip(conv["letters"], choices):
        assert f"{letter}. {choice.strip()}" in user
    assert conv["messages"][1]["content"] == conv["letters"][gold]


def test_arc():
    from tasks.arc import ARC, parse_query
    require_shared_data("eval", "core", "eval_data", "world_knowledge", "arc_easy.jsonl")
    assert parse_query("Question: Why is the sky blue?\nAnswer:") == "Why is the sky blue?"
    for subset, n in (("ARC-Easy", 2376), ("ARC-Challenge", 1172)):
        task = ARC(subset=subset)
        assert len(task) == n and task.eval_type == "categorical"
        for i in range(0, n, 97):
            row, conv = task.rows[i], task[i]
            _check_mc(conv, row["query"][len("Question: "):], row["choices"], row["gold"])
            assert "Question:" not in conv["messages"][0]["content"]
            gold = conv["letters"][row["gold"]]
            assert task.evaluate(conv, gold) and task.evaluate(conv, f" {gold}\n")
            assert not task.evaluate(conv, "ABCD".replace(gold, "")[0])
    with pytest.raises(ValueError):
        ARC(subset="ARC-Hard")


def test_mmlu(tmp_path):
    from tasks.mmlu import MMLU, SUBJECTS
    mmlu_dir = require_shared_data("eval", "mmlu")
    assert len(SUBJECTS) == 57
    dev = MMLU(split="dev")
    assert len(dev) == 285 and dev.eval_type == "categorical"
    assert {c["subject"] for c in dev} == set(SUBJECTS)
    with open(os.path.join(mmlu_dir, "dev", "anatomy_dev.csv"), encoding="utf-8", newline="") as f:
        raw = list(csv.DictReader(f))
    anatomy = MMLU(split="dev", subject="anatomy")
    assert len(anatomy) == len(raw) == 5
    for row, conv in zip(raw, anatomy):
        choices = [row[f"choice{k}"] for k in range(4)]
        _check_mc(conv, row["question"], choices, int(row["answer"]))
        assert anatomy.evaluate(conv, "ABCD"[int(row["answer"])])
    assert len(MMLU(split="test")) == 14042
    assert 100 < len(MMLU(split="test", subject="high_school_physics")) < 1000
    # auxiliary_train: a clear error without a file, the original letter layout with one
    with pytest.raises(FileNotFoundError, match="auxiliary_train"):
        MMLU(split="auxiliary_train")
    aux = tmp_path / "aux.csv"
    with open(aux, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["What is 1+1?", "1", "2", "3", "4", "B"], ["Pick C", "a", "b", "c", "d", "C"]])
    aux_task = MMLU(split="auxiliary_train", path=str(aux))
    assert [c["messages"][1]["content"] for c in aux_task] == ["B", "C"]
    aux.write_text("q,a,b,c,d,E\n")
    with pytest.raises(ValueError, match="answer"):
        MMLU(split="auxiliary_train", path=str(aux))


# -----------------------------------------------------------------------------
# GSM8K


def test_gsm8k_answer_extraction_and_parts():
    from tasks.gsm8k import GSM8K, extract_answer, normalize_number
    require_shared_data("eval", "gsm8k", "train.jsonl")
    assert normalize_number("1,080") == "1080" and normalize_number("$5.50") == "5.5"
    assert normalize_number("72.00") == "72" and normalize_number("abc") is None
    assert extract_answer("so #### 1,000.") == "1000" and extract_answer("no marker 5") is None
    assert extract_answer("#### 3\nlater #### -4") == "-4"
    task = GSM8K(split="train")
    assert len(task) == 7473 and len(GSM8K(split="test")) == 1319
    n_calls = 0
    for row, conv in zip(task.rows, task):
        gold = extract_answer(row["answer"])
        assert gold is not None and "," not in gold
        assert float(gold) == float(row["answer"].split("####")[-1].replace(",", ""))
        parts = conv["messages"][1]["content"]
        # round trip: putting the annotations back gives the original answer
        rebuilt, i = "", 0
        while i < len(parts):
            if parts[i]["type"] == "python":
                assert parts[i + 1]["type"] == "python_output"
                rebuilt += f"<<{parts[i]['text']}={parts[i + 1]['text']}>>"
                i += 2
                n_calls += 1
            else:
                assert parts[i]["type"] == "text"
                rebuilt += parts[i]["text"]
                i += 1
        assert rebuilt == row["answer"]
        assert task.evaluate(conv, content_text(parts)) == 1
    assert n_calls > 20000
    conv = task[0]
    assert task.evaluate(conv, "48/2 = 24, 48+24 = 72\n#### 72") == 1
    assert task.evaluate(conv, "#### 72.0") == 1
    assert task.evaluate(conv, "#### 71") == 0 and task.evaluate(conv, "72") == 0
    validate_conversation(conv)

# -----------------------------------------------------------------------------
# HumanEval


def _humaneval():
    from tasks.humaneval import HumanEval
    require_shared_data("eval", "humaneval", "HumanEval.jsonl.gz")
    return HumanEval()


def test_humaneval_reference_passes_empty_fails():
    task = _humaneval()
    assert len(task) == 164
    for i in (0, 2, 11, 53, 100):
        conv = task[i]
        row = task.rows[i]
        assert task.evaluate(conv, conv["messages"][1]["content"]), conv["task_id"]  # fenced full function
        assert task.evaluate(conv, row["canonical_solution"])  # raw body continuing the prompt
        assert not task.evaluate(conv, "")
        assert not task.evaluate(conv, "    pass\n")


def test_humaneval_completion_extraction():
    from tasks.humaneval import build_program, extract_code
    assert extract_code("Sure!\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```py\nimport os\n```\n```python\ndef g(): pass\n```") == "def g(): pass\n"
    assert extract_code("    return 1\n") == "    return 1\n"
    assert extract_code("```python\ndef h():\n    return 2") == "def h():\n    return 2"  # unterminated fence
    prompt = 'def add(a, b):\n    """Add."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    full = build_program(prompt, "```python\ndef add(a, b):\n    return a + b\n```")
    body = build_program(prompt, "    return a + b\n")
    from nanochat.execution import check_function
    assert check_function(full, "add", test, setup=prompt).passed and check_function(body, "add", test).passed
    assert not check_function(build_program(prompt, "    return a - b\n"), "add", test).passed
    task = _humaneval()
    conv = task[0]
    for cheat in ("import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "print('passed')\n"):
        assert not task.evaluate(conv, cheat)  # exiting or printing before the tests run is not a pass


@pytest.mark.slow
def test_humaneval_all_reference_solutions_pass():
    task = _humaneval()
    failed = [c["task_id"] for c in task if not task.evaluate(c, c["messages"][1]["content"])]
    assert failed == []

# -----------------------------------------------------------------------------
# Chat files and identity


def _write_jsonl(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def test_chat_task_user_files(tmp_path):
    from tasks.chat import ChatTask
    convs = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
             for i in range(5)]
    for name in ("mine.jsonl", "mine.jsonl.gz"):
        _write_jsonl(tmp_path / name, convs)
        task = ChatTask(str(tmp_path / name))
        assert len(task) == 5 and task[3] == convs[3]
    _write_jsonl(tmp_path / "bad.jsonl", convs[:2] + [{"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:3: .*role 'bot'"):
        ChatTask(str(tmp_path / "bad.jsonl"))
    _write_jsonl(tmp_path / "broken.jsonl", [convs[0], "{not json"])
    with pytest.raises(ValueError, match=r"broken.jsonl:2"):
        ChatTask(str(tmp_path / "broken.jsonl"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        ChatTask(str(tmp_path / "missing.jsonl"))


def test_chat_task_shared_files():
    from tasks.chat import ChatTask
    require_shared_data("chat")
    for name, n in (("alpaca_seed_tasks", 175), ("self_instruct_user_oriented", 252), ("dolly_hhrlhf_small", 900)):
        assert len(ChatTask(name)) == n
    with pytest.raises(FileNotFoundError, match="no_such_file"):
        ChatTask("no_such_file")


def test_identity_conversations():
    from tasks.identity import IdentityTask, DEFAULT_PATH
    task = IdentityTask()
    assert DEFAULT_PATH.endswith("identity_conversations.jsonl") and 25 <= len(task) <= 60
    replies = [content_text(m["content"]) for c in task for m in c["messages"] if m["role"] == "assistant"]
    assert sum("nanochat" in r for r in replies) >= 20
    assert any("open-source" in r for r in replies)
    assert len({c["messages"][0]["content"] for c in task}) == len(task)  # varied, no duplicate openers
    assert [c["messages"][0]["content"] for c in IdentityTask(seed=3, stop=4)] != \
        [c["messages"][0]["content"] for c in IdentityTask(stop=4)]

# -----------------------------------------------------------------------------
# Downloader, against a local server


class _Handler(http.server.BaseHTTPRequestHandler):
    root = None
    fail_first = {}  # path -> number of 500s still to send

    def do_GET(self):
        if self.fail_first.get(self.path, 0) > 0:
            self.fail_first[self.path] -= 1
            self.send_error(500, "try again")
            return
        if self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"only a little")
            self.wfile.flush()
            self.close_connection = True
            return
        path = os.path.join(self.root, self.path.lstrip("/"))
        if not os.path.isfile(path):
            self.send_error(404, "Not Found")
            return
        data = open(path, "rb").read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = type("Handler", (_Handler,), {"root": str(root), "fail_first": {}})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root, handler
    httpd.shutdown()
    httpd.server_close()


def _leftovers(folder):
    return [f for f in os.listdir(folder) if f.endswith(".part")]


def test_download_file(server, tmp_path):
    from tasks.download import DownloadError, download_file, validate_jsonl
    url, root, handler = server
    (root / "data.jsonl").write_text('{"a": 1}\n{"a": 2}\n')
    out = tmp_path / "out"
    dest = download_file(f"{url}/data.jsonl", str(out / "sub" / "data.jsonl"), validate=validate_jsonl)
    assert open(dest).read() == '{"a": 1}\n{"a": 2}\n'
    # 404: a clear error, nothing written, no retry
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(f"{url}/nope.jsonl", str(out / "nope.jsonl"), backoff=0.01)
    assert not (out / "nope.jsonl").exists()
    # a body shorter than its Content-Length: retried, then an error, nothing kept
    with pytest.raises(DownloadError, match="(?i)incomplete"):
        download_file(f"{url}/truncated", str(out / "t.bin"), retries=1, backoff=0.01)
    assert not (out / "t.bin").exists()
    # corrupt content: the validation hook or the checksum rejects it, and an existing good file survives
    (root / "corrupt.jsonl").write_text("<html>error page</html>\n")
    with pytest.raises(DownloadError, match="validation"):
        download_file(f"{url}/corrupt.jsonl", dest, validate=validate_jsonl)
    assert open(dest).read() == '{"a": 1}\n{"a": 2}\n'
    with pytest.raises(DownloadError, match="sha256"):
        download_file(f"{url}/data.jsonl", str(out / "c.jsonl"), sha256="0" * 64)
    assert not (out / "c.jsonl").exists()
    # transient 500s are retried with backoff
    handler.fail_first["/data.jsonl"] = 2
    download_file(f"{url}/data.jsonl", str(out / "r.jsonl"), retries=3, backoff=0.01)
    assert (out / "r.jsonl").exists() and handler.fail_first["/data.jsonl"] == 0
    handler.fail_first["/data.jsonl"] = 5
    with pytest.raises(DownloadError, match="HTTP 500"):
        download_file(f"{url}/data.jsonl", str(out / "r2.jsonl"), retries=1, backoff=0.01)
    assert _leftovers(out) == [] and _leftovers(out / "sub") == []


def test_download_file_refetches_invalid_files_within_the_retry_budget(server, tmp_path):
    """refetch_invalid (the pretraining shards use it): a file that fails its check is fetched again, counted
    against the same retries as network errors; without it a failed check is final. Errors carry the HTTP
    status and the number of attempts."""
    from nanochat.download import DownloadError, download_file
    url, root, handler = server
    (root / "data.jsonl").write_text('{"a": 1}\n')
    out = tmp_path / "out"
    calls = []

    def flaky(path):  # the first two transfers that arrive are "corrupt"
        calls.append(path)
        if len(calls) <= 2:
            raise ValueError("bad bytes")

    handler.fail_first["/data.jsonl"] = 1  # and a 500 before them: one budget for both kinds of failure
    dest = download_file(f"{url}/data.jsonl", str(out / "a.jsonl"), validate=flaky, retries=3, backoff=0.01,
                         refetch_invalid=True)
    assert open(dest).read() == '{"a": 1}\n' and len(calls) == 3 and handler.fail_first["/data.jsonl"] == 0
    calls.clear()
    with pytest.raises(DownloadError, match="failed validation: bad bytes") as e:
        download_file(f"{url}/data.jsonl", str(out / "b.jsonl"), validate=flaky, retries=1, backoff=0.01,
                      refetch_invalid=True)
    assert e.value.attempts == 2 and len(calls) == 2 and not (out / "b.jsonl").exists()
    calls.clear()
    with pytest.raises(DownloadError, match="failed validation") as e:
        download_file(f"{url}/data.jsonl", str(out / "c.jsonl"), validate=flaky, retries=3, backoff=0.01)
    assert e.value.attempts == 1 and len(calls) == 1  # the default: a failed check is final

    def not_gzip(path):  # a check that raises OSError is still a failed check, not a network error
        raise OSError("Not a gzipped file")

    with pytest.raises(DownloadError, match="failed validation: Not a gzipped file") as e:
        download_file(f"{url}/data.jsonl", str(out / "d.jsonl"), validate=not_gzip, retries=3, backoff=0.01)
    assert e.value.attempts == 1
    with pytest.raises(DownloadError, match="HTTP 404") as e:
        download_file(f"{url}/nope.jsonl", str(out / "e.jsonl"), retries=3, backoff=0.01, refetch_invalid=True)
    assert e.value.status == 404 and e.value.attempts == 1
    assert _leftovers(out) == [] and sorted(os.listdir(out)) == ["a.jsonl"]


def test_download_eval_data_from_mirror(server, tmp_path, monkeypatch):
    from tasks.download import eval_files, main
    from tasks.gsm8k import GSM8K
    url, root, _ = server
    rows = [{"question": "What is 2+3?", "answer": "2+3=<<2+3=5>>5\n#### 5"}]
    for rel in eval_files()["gsm8k"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(root / rel, rows)
    dest = tmp_path / "data"
    monkeypatch.setenv("NANOCHAT_EVAL_URL", url)
    main([f"--dest={dest}", "--only=gsm8k"])
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(dest))
    task = GSM8K(split="test")
    assert len(task) == 1 and task.evaluate(task[0], "#### 5")
    with pytest.raises(SystemExit):
        main([f"--dest={dest}", "--only=humaneval"])  # the mirror has no HumanEval: a clear error, exit 1
    with pytest.raises(SystemExit):
        main(["--only=nosuchgroup"])
