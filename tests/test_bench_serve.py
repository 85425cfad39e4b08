"""bench/serve.py at a tiny size: the real server on 127.0.0.1 with a depth-1 random model, a few streaming clients
at two concurrencies, the batched server against --max-batch=1 and a sweep; its tables come out with finite
figures, every request is answered, and (fp32, same seeds) every server generates the same tokens."""
import json
import math
import os

import pytest
from conftest import FIXTURE_CHAT, markdown_rows

from bench.serve import main, percentile


def _tiny(base_dir, *flags):
    return ["--depth=1", "--n-embd=64", "--n-head=2", "--seq-len=128", "--device-type=cpu",
            f"--tokenizer-dir={os.path.join(base_dir, 'tokenizer')}", *flags]


def test_tiny_serving_bench(tokenizer, base_dir, capsys):
    result = main(_tiny(base_dir, "--concurrency=1,3", "--max-batch=3", "--sweep=2,3", "--sweep-concurrency=3",
                        "--requests-per-client=2", "--max-tokens=6", "--rounds=2"))
    out = capsys.readouterr().out
    user_turns = sum(m["role"] == "user" for name in sorted(os.listdir(FIXTURE_CHAT))
                     for line in open(os.path.join(FIXTURE_CHAT, name)) if line.strip()
                     for m in json.loads(line)["messages"])
    assert f"prompts: {user_turns} user turns" in out
    cells = {(c["max_batch"], c["concurrency"]): c for c in result["cells"]}
    assert set(cells) == {(3, 1), (1, 1), (3, 3), (1, 3), (2, 3)}
    for (b, n), c in cells.items():
        assert c["errors"] == 0 and c["requests"] == 2 * 2 * n and len(c["tokens_per_s_rounds"]) == 2, c
        assert 0 < c["tokens"] <= 6 * c["requests"]
        assert math.isfinite(c["tokens_per_s"]) and min(c["tokens_per_s_rounds"]) <= c["tokens_per_s"] <= max(c["tokens_per_s_rounds"])
        assert 0 < c["ttft_p50"] <= c["ttft_p95"] and 0 < c["tpot_p50"] <= c["tpot_p95"], c
        # the server's own part of it (job at its replica -> first token sampled): within what the client saw
        assert 0 < c["server_ttft_p50"] <= c["server_ttft_p95"] and c["server_ttft_p50"] < c["ttft_p50"], c
    for n in (1, 3):  # same prompts and seeds: in fp32 a request's tokens do not depend on the batch it ran in
        assert len({c["tokens"] for (b, m), c in cells.items() if m == n}) == 1
    assert result["stagger_s"] > 0 and result["recommended_max_batch"] in (2, 3)

    main_rows = markdown_rows(out, "| streams |")
    assert [r[0] for r in main_rows] == ["1", "3"]
    for row in main_rows:
        batched, single = (float(x.replace(",", "")) for x in row[1:3])
        assert float(row[3].rstrip("x")) == pytest.approx(batched / single, rel=0.02, abs=0.01)  # from unrounded figures
        assert len(row) == 11 and " / " in row[10]  # the server-side TTFT column
    assert [r[:2] for r in markdown_rows(out, "| max-batch |")] == [["2", "3"], ["3", "3"]]
    assert f"recommended --max-batch: {result['recommended_max_batch']}" in out


@pytest.mark.parametrize("flags, named", [
    (["--concurrency=0,2"], "--concurrency"),
    (["--concurrency=a"], "--concurrency"),
    (["--sweep=4,x"], "--sweep"),
    (["--data=/nonexistent/chat.jsonl"], "--data"),
    (["--max-tokens=128"], "--max-tokens"),
    (["--temperature=3"], "--temperature"),
])
def test_bad_flags_are_named(tokenizer, base_dir, capsys, flags, named):
    with pytest.raises(SystemExit) as e:
        main(_tiny(base_dir, *flags))
    assert e.value.code == 2 and named in capsys.readouterr().err


def test_bad_data_file_is_named(tokenizer, base_dir, tmp_path, capsys):
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "hi"}]}\n')
    with pytest.raises(SystemExit):
        main(_tiny(base_dir, f"--data={bad}"))
    err = capsys.readouterr().err
    assert "--data" in err and f"{bad}:1" in err


def test_percentile():
    assert percentile([3, 1, 2], 50) == 2 and percentile([1, 2], 50) == 1.5
    assert percentile([0, 10], 95) == pytest.approx(9.5) and percentile([5], 95) == 5
    assert math.isnan(percentile([], 50))


def test_serves_a_checkpoint(tiny_checkpoint, capsys):
    ckpt_dir, _ = tiny_checkpoint
    result = main(["-i", "base", "-g", "tiny", "--device-type=cpu", "--concurrency=2", "--max-batch=2", "--sweep=",
                   "--requests-per-client=1", "--max-tokens=4", "--rounds=1", "--client-process=false"])
    out = capsys.readouterr().out
    assert result["model"] == "tiny-step40" and "context 64" in out and "| 2 |" in out
    assert all(c["errors"] == 0 and c["requests"] == 2 for c in result["cells"]) and result["recommended_max_batch"] is None
