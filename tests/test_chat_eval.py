"""
Chat evaluation tests. A byte-level tokenizer (the real Tokenizer class with no merges), a model whose
logits are chosen per prompt prefix, tiny categorical tasks and a scripted engine stand in for the real
ones, so every accuracy below is known in advance.
"""
import dataclasses
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch
import torch.nn as nn

from nanochat import chat_eval as ce
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from tasks.common import Task, mc_conversation
from tasks.gsm8k import GSM8K

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -----------------------------------------------------------------------------
# Stand-ins


def byte_tokenizer():
    """Every byte is one token (ids 0-255), then our special tokens: letters are single tokens."""
    return Tokenizer({bytes([i]): i for i in range(256)}, {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})


class PrefixModel(nn.Module):
    """Logits at position t depend only on the tokens up to t (like a causal model): `overrides` maps a
    prefix (tuple of ids) to chosen logits, any other prefix gets pseudo-random logits seeded by a hash
    of it. Records the shape of every forward."""

    def __init__(self, vocab_size, overrides=None):
        super().__init__()
        self.vocab_size = vocab_size
        self.overrides = overrides or {}
        self.calls = []
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, idx):
        self.calls.append(tuple(idx.shape))
        B, T = idx.shape
        out = torch.empty(B, T, self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            h = 0
            for t in range(T):
                h = zlib.crc32(row[t].to_bytes(4, "little"), h)
                key = tuple(row[:t + 1]) if self.overrides else None
                if key in self.overrides:
                    out[b, t] = self.overrides[key]
                else:
                    out[b, t] = torch.randn(self.vocab_size, generator=torch.Generator().manual_seed(h))
        return out


class ListTask(Task):
    """A categorical task over given conversations; records the ids of the problems it scored."""
    eval_type = "categorical"

    def __init__(self, conversations, **kwargs):
        super().__init__(**kwargs)
        self.conversations = conversations
        self.seen = []

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]

    def evaluate(self, conversation, completion):
        self.seen.append(conversation["id"])
        return completion == conversation["messages"][-1]["content"]


def mc_problems(n, num_choices=4, seed=0):
    """n multiple-choice conversations of varied length (so batches need padding)."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = num_choices[i % len(num_choices)] if isinstance(num_choices, (list, tuple)) else num_choices
        question = f"Question {i}: " + "why " * int(torch.randint(0, 12, (1,), generator=rng))
        choices = [f"choice {i}.{j}" for j in range(k)]
        gold = int(torch.randint(0, k, (1,), generator=rng))
        out.append(mc_conversation(question + "?", choices, gold, id=i))
    return out


def steer(tokenizer, conversations, picks, vocab_size):
    """Overrides making each conversation's candidate logits rank picks[i] first among its letters, while
    a non-candidate token ('Z', 'a' and <|assistant_end|>) scores higher than any candidate."""
    overrides = {}
    for conv, pick in zip(conversations, picks):
        logits = torch.zeros(vocab_size)
        for tok in (ord("Z"), ord("a"), tokenizer.encode_special("<|assistant_end|>")):
            logits[tok] = 100.0
        for rank, letter in enumerate(conv["letters"]):
            logits[ord(letter)] = -float(rank)
        logits[ord(pick)] = 10.0
        overrides[tuple(tokenizer.render_for_completion(conv))] = logits
    return overrides


def write_gsm8k(path, rows):
    with open(path, "w") as f:
        for question, answer in rows:
            f.write(json.dumps({"question": question, "answer": f"Work it out.\n#### {answer}"}) + "\n")


class ScriptedEngine:
    """generate_batch with the Engine's interface: replies come from `script[question]` (one per sample);
    records the arguments of every call."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate_batch(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None,
                       seed=42):
        text = self.tokenizer.decode(tokens)
        question = next(q for q in self.script if q in text)
        self.calls.append(dict(question=question, num_samples=num_samples, max_tokens=max_tokens,
                               temperature=temperature, top_k=top_k, seed=seed))
        replies = self.script[question][:num_samples]
        results = [list(tokens) + self.tokenizer.encode(r) for r in replies]
        masks = [[0] * len(tokens) + [1] * (len(r) - len(tokens)) for r in results]
        return results, masks


# GSM8K problems and 3 scripted samples each; the question of the last holds "#### 7" (its gold), so
# scoring the prompt together with the reply would wrongly count it solved.
GSM_SCRIPT = [
    ("Ann has 2 apples and buys 3. How many?", 5, ["#### 4", "#### 6", "no idea"]),
    ("Bob has 10 pens and loses 4. How many?", 6, ["#### 5", "#### 7", "so #### 6"]),
    ("What is 3 times 3?", 9, ["#### 9", "#### 9.00", "#### 9"]),
    ("Write #### 7 after computing 3 + 4.", 7, ["it is seven", "seven", "7"]),
]


def make_fixture(tmpdir, n_mc=11):
    """(tokenizer, model, tasks, engine) with known answers: the model picks the gold letter on the
    problems with even id and the next letter on odd ones; GSM8K pass@1 = 1/4, pass@3 = 2/4."""
    tok = byte_tokenizer()
    V = tok.get_vocab_size()
    convs = mc_problems(n_mc, num_choices=[4, 3, 4, 5])
    picks = []
    for c in convs:
        gold = c["messages"][-1]["content"]
        letters = c["letters"]
        picks.append(gold if c["id"] % 2 == 0 else letters[(letters.index(gold) + 1) % len(letters)])
    model = PrefixModel(V, steer(tok, convs, picks, V))
    path = os.path.join(tmpdir, "gsm8k.jsonl")
    write_gsm8k(path, [(q, a) for q, a, _ in GSM_SCRIPT])
    tasks = {"ARC-Easy": ListTask(convs), "GSM8K": GSM8K(path=path)}
    engine = ScriptedEngine(tok, {q: replies for q, _, replies in GSM_SCRIPT})
    return tok, model, tasks, engine

# -----------------------------------------------------------------------------
# Categorical scoring


def test_picks_highest_candidate_letter_only():
    tok = byte_tokenizer()
    V = tok.get_vocab_size()
    convs = mc_problems(6, num_choices=[4, 3, 5])
    picks = ["B", "C", "A", "D", "A", "E"]
    picks = [p if p in c["letters"] else c["letters"][-1] for p, c in zip(picks, convs)]
    model = PrefixModel(V, steer(tok, convs, picks, V))
    assert ce.predict_letters(model, tok, convs) == picks
    # 3 letters: 'D' is a letter token too but not a candidate; it must never be chosen
    three = [c for c in convs if len(c["letters"]) == 3]
    for c in three:
        key = tuple(tok.render_for_completion(c))
        model.overrides[key][ord("D")] = 50.0
    assert ce.predict_letters(model, tok, three) == [p for p, c in zip(picks, convs) if len(c["letters"]) == 3]


def test_batched_equals_one_by_one():
    tok = byte_tokenizer()
    convs = mc_problems(13, num_choices=[4, 3, 4, 5], seed=1)
    model = PrefixModel(tok.get_vocab_size())  # pseudo-random logits, a function of the prefix only
    single = [ce.predict_letters(model, tok, [c])[0] for c in convs]
    assert len(set(single)) > 1, "the test needs varied answers to mean anything"
    assert ce.predict_letters(model, tok, convs) == single
    lengths = {len(tok.render_for_completion(c)) for c in convs}
    assert len(lengths) > 3, "prompts of different lengths, so batches are padded"
    # through the task evaluation: the same number correct at every batch size, in ceil(n / bs) forwards
    task = ListTask(convs)
    expected = sum(p == c["messages"][-1]["content"] for p, c in zip(single, convs))
    for bs in (1, 4, 13, 64):
        model.calls.clear()
        assert ce.evaluate_categorical(task, model, tok, list(range(13)), batch_size=bs) == expected
        assert len(model.calls) == -(-13 // bs)


def tiny_gpt(vocab_size, seed=0):
    from nanochat.gpt import GPT, config_for_depth
    torch.manual_seed(seed)
    model = GPT(config_for_depth(1, vocab_size, sequence_len=128, head_dim=32))
    model.init_weights()
    with torch.no_grad():  # the reference init zeroes the head: every logit would tie
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def test_real_gpt_batched_equals_one_by_one():
    tok = byte_tokenizer()
    model = tiny_gpt(tok.get_vocab_size())
    convs = mc_problems(9, num_choices=[4, 3, 5], seed=2)
    single = [ce.predict_letters(model, tok, [c])[0] for c in convs]
    assert len(set(single)) > 1
    assert ce.predict_letters(model, tok, convs) == single


def test_letters_must_be_single_tokens():
    class TwoTokenLetters:
        def encode(self, text):
            return [1, 2]
    with pytest.raises(ValueError, match="answer letter 'A' encodes to 2 tokens"):
        ce.letter_token_ids(TwoTokenLetters(), ["A", "B"])
    assert ce.letter_token_ids(byte_tokenizer(), ["A", "B", "C"]) == [65, 66, 67]

# -----------------------------------------------------------------------------
# Generative scoring, pass@k


def test_pass_at_k(tmp_path):
    tok, model, tasks, engine = make_fixture(str(tmp_path))
    gsm = tasks["GSM8K"]
    assert ce.pass_at_k([False, False, True]) and not ce.pass_at_k([False, False]) and not ce.pass_at_k([])
    # pass@3: problems 1 (third sample) and 2 solved; problem 3 only has "#### 7" in its prompt
    solved = ce.evaluate_generative(gsm, engine, tok, [0, 1, 2, 3], num_samples=3, max_new_tokens=17,
                                    temperature=0.7, top_k=5, seed=100)
    assert solved == 2
    assert [c["num_samples"] for c in engine.calls] == [3] * 4
    assert {(c["max_tokens"], c["temperature"], c["top_k"]) for c in engine.calls} == {(17, 0.7, 5)}
    assert [c["seed"] for c in engine.calls] == [100, 101, 102, 103]  # seed + problem index
    # pass@1 takes only the first sample: only problem 2; top_k 0 means no top-k
    engine.calls.clear()
    assert ce.evaluate_generative(gsm, engine, tok, [0, 1, 2, 3], num_samples=1, top_k=0) == 1
    assert {c["top_k"] for c in engine.calls} == {None}


def test_engine_result_must_start_with_prompt(tmp_path):
    tok, _, tasks, _ = make_fixture(str(tmp_path))

    class Broken:
        def generate_batch(self, tokens, num_samples=1, **kw):
            return [tok.encode("#### 5")] * num_samples, [[1] * 6] * num_samples
    with pytest.raises(RuntimeError, match="does not start with the prompt"):
        ce.sample_replies(Broken(), tok, tasks["GSM8K"][0])

# -----------------------------------------------------------------------------
# Whole runs, ChatCORE, report


def test_centered_accuracy_and_chatcore():
    assert ce.centered_accuracy(0.25, 0.25) == 0.0
    assert ce.centered_accuracy(1.0, 0.25) == 1.0
    assert ce.centered_accuracy(0.625, 0.25) == pytest.approx(0.5)
    assert ce.centered_accuracy(0.3, 0.0) == pytest.approx(0.3)
    assert ce.chat_core({"a": {"centered": 0.5}, "b": {"centered": -0.1}}) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        ce.chat_core({})


def test_run_chat_eval(tmp_path):
    tok, model, tasks, engine = make_fixture(str(tmp_path), n_mc=8)  # ids 0,2,4,6 right: 4/8
    model.train()
    out = ce.run_chat_eval(model, tok, engine, "arc-easy|GSM8K", num_samples=3, tasks=tasks, batch_size=3)
    assert model.training, "the model's mode is restored"
    arc, gsm = out["results"]["ARC-Easy"], out["results"]["GSM8K"]
    assert (arc["correct"], arc["num_problems"], arc["accuracy"]) == (4, 8, 0.5)
    assert arc["centered"] == pytest.approx((0.5 - 0.25) / 0.75)
    assert (gsm["correct"], gsm["num_problems"], gsm["metric"]) == (2, 4, "pass@3")
    assert gsm["centered"] == pytest.approx(0.5)
    assert out["chatcore"] == pytest.approx(((0.5 - 0.25) / 0.75 + 0.5) / 2)
    assert out["metrics"] == {"ARC-Easy": 0.5, "GSM8K": 0.5, "ChatCORE": out["chatcore"]}
    table = ce.format_results_table(out)
    assert "pass@3" in table and "ChatCORE" in table
    path = ce.write_report(out, "sft", {"source": "sft"})
    text = open(path).read()
    assert text.startswith("## Chat evaluation sft") and "| GSM8K | pass@3 | 4 | 0.5000 | 0.5000 |" in text
    record = json.load(open(path[:-len(".md")] + ".json"))
    assert record["metrics"] == pytest.approx(out["metrics"])


def test_max_problems_is_a_fixed_sample(tmp_path):
    order = ce.problem_order(100, 10)
    assert order == ce.problem_order(100, 10) and len(set(order)) == 10 and order != list(range(10))
    assert ce.problem_order(5, 10) == list(range(5)) and ce.problem_order(5) == list(range(5))
    tok, model, tasks, engine = make_fixture(str(tmp_path))
    out = ce.run_chat_eval(model, tok, engine, ["ARC-Easy"], max_problems=5, tasks=tasks)
    assert out["results"]["ARC-Easy"]["num_problems"] == 5
    assert sorted(tasks["ARC-Easy"].seen) == sorted(ce.problem_order(11, 5))


def test_parse_task_names():
    assert ce.parse_task_names("ARC-Easy|gsm8k|ARC-Easy") == ["ARC-Easy", "GSM8K"]
    assert ce.parse_task_names(["MMLU"]) == ["MMLU"]
    with pytest.raises(ValueError, match="unknown task 'Foo'"):
        ce.parse_task_names("ARC-Easy|Foo")
    with pytest.raises(ValueError, match="empty task name"):
        ce.parse_task_names("ARC-Easy||MMLU")


def test_task_registry(tmp_path, monkeypatch):
    """tasks.registry loads tasks by the library's names; 'none' or '' switches evaluation off."""
    from tasks import registry
    assert registry.TASK_NAMES is ce.TASK_NAMES and registry.parse_task_names is ce.parse_task_names
    for off in ("none", " None ", "", "  ", None, []):
        assert registry.load_tasks(off) == {}
    with pytest.raises(ValueError, match="unknown task 'Foo'"):
        registry.load_tasks("ARC-Easy|Foo")
    with pytest.raises(ValueError, match="unknown task 'Foo'"):
        registry.load_task("Foo")
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(tmp_path))  # GSM8K's test split where tasks/ looks for it
    (tmp_path / "eval" / "gsm8k").mkdir(parents=True)
    write_gsm8k(str(tmp_path / "eval" / "gsm8k" / "test.jsonl"), [(q, a) for q, a, _ in GSM_SCRIPT])
    loaded = registry.load_tasks("gsm8k|GSM8K")
    assert list(loaded) == ["GSM8K"] and isinstance(loaded["GSM8K"], GSM8K) and len(loaded["GSM8K"]) == len(GSM_SCRIPT)
    with pytest.raises(FileNotFoundError, match="NANOCHAT_DATA_DIR"):
        registry.load_tasks("MMLU")


def test_run_chat_eval_takes_loaded_tasks_only(tmp_path):
    """The library never loads tasks itself: a named task missing from `tasks` is an error naming the fix,
    and without names it evaluates the tasks it was given."""
    tok, model, tasks, engine = make_fixture(str(tmp_path))
    with pytest.raises(ValueError, match=r"MMLU not loaded.*tasks.registry.load_tasks"):
        ce.run_chat_eval(model, tok, engine, "ARC-Easy|MMLU", tasks=tasks)
    out = ce.run_chat_eval(model, tok, engine, tasks={"ARC-Easy": tasks["ARC-Easy"]})
    assert list(out["results"]) == ["ARC-Easy"]
    import ast
    tree = ast.parse(open(ce.__file__).read())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m == "tasks" or m.startswith("tasks.")], imported


def test_pass_at_k_first_k_and_lazy():
    assert [ce.pass_at_k([0, 0, 1, 0], k) for k in (1, 2, 3, 4, None)] == [0, 0, 1, 1, 1]
    graded = []

    def outcomes():
        for o in (False, True, True, True):
            graded.append(o)
            yield o
    assert ce.pass_at_k(outcomes()) == 1 and graded == [False, True]  # stops at the first correct sample

# -----------------------------------------------------------------------------
# Distributed: 2 gloo ranks agree with one process


def test_distributed_two_gloo_ranks(tmp_path):
    out_dir = str(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "tests", "workers", "chat_eval_worker.py"), out_dir]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in (0, 1)]
    tok, model, tasks, engine = make_fixture(out_dir)
    single = ce.run_chat_eval(model, tok, engine, ["ARC-Easy", "GSM8K"], num_samples=3, tasks=tasks)
    for r in ranks:
        assert r["world_size"] == 2
        assert r["metrics"] == pytest.approx(single["metrics"])
        assert r["results"]["ARC-Easy"]["num_problems"] == 11
    # the ranks split the problems: disjoint, together all of them
    mc0, mc1 = ranks[0]["mc_seen"], ranks[1]["mc_seen"]
    assert not set(mc0) & set(mc1) and sorted(mc0 + mc1) == list(range(11))
    assert mc0 and mc1
    gen0, gen1 = ranks[0]["gen_seeds"], ranks[1]["gen_seeds"]
    assert sorted(gen0 + gen1) == [42, 43, 44, 45] and not set(gen0) & set(gen1)

# -----------------------------------------------------------------------------
# The script


def run_script(argv, capsys):
    from scripts.chat_eval import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys):
    code, err = run_script(["-i", "sft", "-a", "ARC-Easy|Foo"], capsys)
    assert code == 2 and "-a/--task-name" in err and "unknown task 'Foo'" in err
    code, err = run_script(["-i", "chat"], capsys)
    assert code == 2 and "-i/--source" in err and "invalid choice: 'chat'" in err
    code, err = run_script(["-a", "MMLU"], capsys)
    assert code == 2 and "-i/--source" in err
    code, err = run_script(["-i", "sft", "--temperature=-1"], capsys)
    assert code == 2 and "--temperature" in err
    code, err = run_script(["-i", "sft", "--max-problems=0"], capsys)
    assert code == 2 and "--max-problems" in err


def test_cli_no_checkpoint_message(tmp_path):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path), PYTHONPATH=REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "scripts.chat_eval", "-i", "mid", "-a", "ARC-Easy",
                           "--device-type=cpu"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "chat_eval: no mid checkpoint in" in proc.stderr and "scripts.mid_train" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    """A saved tiny GPT checkpoint and tokenizer, ARC-Easy data in the CORE layout: the script runs,
    prints the table and writes the report section."""
    from nanochat.checkpoint import save_checkpoint
    from scripts.chat_eval import main
    base, data = tmp_path / "base", tmp_path / "data"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data))
    tok = byte_tokenizer()
    tok.save(str(base / "tokenizer"))
    model = tiny_gpt(tok.get_vocab_size())
    save_checkpoint(str(base / "sft_checkpoints" / "d1"), 5, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(model.config)})
    arc = data / "eval" / "core" / "eval_data" / "world_knowledge"
    arc.mkdir(parents=True)
    with open(arc / "arc_easy.jsonl", "w") as f:
        for i in range(7):
            f.write(json.dumps({"query": f"Question: Item {i} {'why ' * i}?", "choices": [f"c{j}" for j in range(4)],
                                "gold": i % 4}) + "\n")
    out = main(["-i", "sft", "-a", "ARC-Easy", "--batch-size=3", "--device-type=cpu"])
    stdout = capsys.readouterr().out
    # the same model, evaluated directly, gives the same accuracy
    from tasks.arc import ARC
    task = ARC(subset="ARC-Easy")
    direct = ce.evaluate_categorical(task, model, tok, list(range(len(task))), batch_size=1)
    assert out["results"]["ARC-Easy"]["correct"] == direct and out["results"]["ARC-Easy"]["num_problems"] == 7
    assert "ARC-Easy" in stdout and "ChatCORE" in stdout
    report = base / "report" / "chat-evaluation-sft.md"
    assert report.exists() and "## Chat evaluation sft" in report.read_text()

# -----------------------------------------------------------------------------
# With the real inference engine


def test_with_real_engine(tmp_path):
    from nanochat.engine import Engine
    tok, _, tasks, _ = make_fixture(str(tmp_path))
    model = tiny_gpt(tok.get_vocab_size())
    engine = Engine(model, tok)
    out = ce.run_chat_eval(model, tok, engine, "ARC-Easy|GSM8K", num_samples=2, max_new_tokens=6,
                           temperature=1.0, tasks=tasks)
    assert out["results"]["GSM8K"]["num_problems"] == 4 and out["results"]["GSM8K"]["metric"] == "pass@2"
    assert 0.0 <= out["results"]["GSM8K"]["accuracy"] <= 1.0
    # engine=None builds the real Engine itself
    out2 = ce.run_chat_eval(model, tok, None, "GSM8K", num_samples=2, max_new_tokens=6, temperature=1.0,
                            tasks=tasks)
    assert out2["results"]["GSM8K"]["correct"] == out["results"]["GSM8K"]["correct"]  # same seeds
