"""
CORE metric tests. A byte-level toy tokenizer and a toy model whose every loss is known in closed
form stand in for the real ones, so accuracies and CORE are computed by hand below.
"""
import csv
import functools
import http.server
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import threading
import types
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from nanochat import core_bundle as cb
from nanochat import core_eval as ce

# -----------------------------------------------------------------------------
# Toy stand-ins

class ByteTokenizer:
    """UTF-8 bytes shifted up by one; id 0 is BOS."""
    vocab_size = 257

    def get_bos_token_id(self):
        return 0

    def get_vocab_size(self):
        return self.vocab_size

    def _ids(self, text):
        return [b + 1 for b in text.encode("utf-8")]

    def encode(self, text, prepend=None, append=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        return ([prepend] if prepend is not None else []) + self._ids(text) + ([append] if append is not None else [])

    def decode(self, ids):
        return bytes(i - 1 for i in ids if 0 < i < 257).decode("utf-8", errors="replace")


class MergingTokenizer(ByteTokenizer):
    """Like a BPE tokenizer, a space merges with the lowercase letter after it into one token."""
    vocab_size = 257 + 26

    def _ids(self, text):
        ids, i = [], 0
        while i < len(text):
            if text[i] == " " and i + 1 < len(text) and "a" <= text[i + 1] <= "z":
                ids.append(257 + ord(text[i + 1]) - ord("a"))
                i += 2
            else:
                ids += [b + 1 for b in text[i].encode("utf-8")]
                i += 1
        return ids


def tok(ch):
    return ord(ch) + 1


V = ByteTokenizer.vocab_size
LF = math.log(2)            # loss of the token the toy model favours (p = 1/2)
LN = math.log(2 * (V - 1))  # loss of any other token (p = 1/2 / (V-1))


class LastLetterModel(nn.Module):
    """Predicts the alphabet successor (z -> a) of the most recent lowercase letter with p = 1/2 and
    spreads the other half evenly over the rest of the vocabulary; with no letter yet, uniform. Right
    after a ':' it predicts a space the same way (so "A:" + " def" can be all argmax).
    So every loss is LF or LN, and the argmax is the successor (or the space)."""

    def __init__(self, sequence_len=1024):
        super().__init__()
        self.config = SimpleNamespace(sequence_len=sequence_len, vocab_size=V)
        table = torch.full((V, V), math.log(1 / V))
        for c in "abcdefghijklmnopqrstuvwxyz":
            nxt = chr((ord(c) - ord("a") + 1) % 26 + ord("a"))
            table[tok(c)] = math.log(0.5 / (V - 1))
            table[tok(c), tok(nxt)] = math.log(0.5)
        table[tok(":")] = math.log(0.5 / (V - 1))
        table[tok(":"), tok(" ")] = math.log(0.5)
        self.register_buffer("table", table)
        self.calls = []

    def get_device(self):
        return self.table.device

    def forward(self, idx):
        B, T = idx.shape
        assert T <= self.config.sequence_len, f"{T} tokens exceed the context of {self.config.sequence_len}"
        self.calls.append((B, T))
        is_letter = (idx >= tok("a")) & (idx <= tok("z"))
        keys, carry = torch.empty_like(idx), torch.zeros(B, dtype=idx.dtype, device=idx.device)
        for t in range(T):
            carry = torch.where(is_letter[:, t], idx[:, t], carry)
            keys[:, t] = carry
        keys = torch.where(idx == tok(":"), idx, keys)
        return self.table[keys]

# -----------------------------------------------------------------------------
# A toy bundle whose CORE is computed by hand

TOY_YAML = """\
# toy CORE bundle
icl_tasks:
-
  label: toy_mc
  dataset_uri: toy/mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
- label: toy_schema   # item start and key on one line
  dataset_uri: toy/schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
-
  label: toy_lm
  dataset_uri: toy/lm.jsonl
  num_fewshot: 3
  icl_task_type: language_modeling
  continuation_delimiter: "\\nA: "
-
  label: toy_missing
  dataset_uri: toy/missing.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
"""

TOY_META = ("Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description\n"
            "toy_mc,x,multiple choice,2,5,25,,\"a, quoted description\"\n"
            "toy_schema,x,schema,1,4,50,,d\n"
            "toy_lm,x,language modeling,3,6,0,,d\n"
            "toy_missing,x,language modeling,0,1,0,,d\n"
            "unused_task,x,multiple choice,0,1,10,,d\n")

# The delimiter's space is scored first (LN: the model never predicts a space after a letter); each choice's
# first letter is predicted from the last letter of the query ("a").
MC_ITEMS = [
    {"query": "pick after a", "choices": ["bcd", "bzz"], "gold": 0},      # (LN+3LF)/4 vs (3LN+LF)/4 -> 0, right
    {"query": "pick after a", "choices": ["bzz", "bcd"], "gold": 0},      # -> 1, wrong
    {"query": "pick after a", "choices": ["bz", "bcdez"], "gold": 1},     # (2LN+LF)/3 vs (2LN+4LF)/6 -> 1, right (a sum: 0)
    {"query": "pick after a", "choices": ["zz", "cd", "bc"], "gold": 1},  # LN, (2LN+LF)/3, (LN+2LF)/3 -> 2, wrong
    {"query": "pick after a", "choices": ["xy", "bc"], "gold": 1},        # (2LN+LF)/3 vs (LN+2LF)/3 -> 1, right
]
SCHEMA_ITEMS = [  # the scored " " + continuation adds one LN to every option
    {"context_options": ["it was a", "it was m"], "continuation": "bcd", "gold": 0},  # (LN+3LF)/4 vs (2LN+2LF)/4: 0, right
    {"context_options": ["so a", "so b"], "continuation": "cd", "gold": 0},           # (2LN+LF)/3 vs (LN+2LF)/3: 1, wrong
    {"context_options": ["x y", "x q"], "continuation": "rst", "gold": 1},            # (2LN+2LF)/4 vs (LN+3LF)/4: 1, right
    {"context_options": ["no d", "no e"], "continuation": "f", "gold": 1},            # LN vs (LN+LF)/2: 1, right
]
# The delimiter "\nA: " ends the context at ':', so its space is the first scored token (the argmax after
# ':'); the continuation's first letter is predicted from the context's last letter.
LM_ITEMS = [
    {"context": "abc", "continuation": "def"},     # right
    {"context": "abc", "continuation": "dez"},     # wrong at z
    {"context": "xy", "continuation": "z"},        # right
    {"context": "hello", "continuation": "pq"},    # right
    {"context": "k", "continuation": "m"},         # wrong (l expected)
    {"context": "k", "continuation": "l m"},       # wrong at the space
]
ACC = {"toy_mc": 3 / 5, "toy_schema": 3 / 4, "toy_lm": 3 / 6}
CENTERED = {"toy_mc": (0.6 - 0.25) / 0.75, "toy_schema": (0.75 - 0.5) / 0.5, "toy_lm": 0.5}
CORE = sum(CENTERED.values()) / 3


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def make_toy_bundle(root):
    root = str(root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "core.yaml"), "w") as f:
        f.write(TOY_YAML)
    with open(os.path.join(root, "eval_meta_data.csv"), "w") as f:
        f.write(TOY_META)
    write_jsonl(os.path.join(root, "eval_data", "toy", "mc.jsonl"), MC_ITEMS)
    write_jsonl(os.path.join(root, "eval_data", "toy", "schema.jsonl"), SCHEMA_ITEMS)
    write_jsonl(os.path.join(root, "eval_data", "toy", "lm.jsonl"), LM_ITEMS)
    return root


@pytest.fixture
def toy_bundle(tmp_path):
    return make_toy_bundle(tmp_path / "bundle")


def task(task_type, shots=0, delimiter=" ", label="t", baseline=0.0):
    return cb.CoreTask(label, "x.jsonl", task_type, shots, delimiter, baseline)

# -----------------------------------------------------------------------------
# core.yaml and eval_meta_data.csv

def test_parse_core_yaml_subset():
    text = ("icl_tasks:\n"
            "-\n"
            "  label: a   # comment\n"
            "  num_fewshot: [0, 5]\n"
            "  continuation_delimiter: \"\\nAnswer: \"  # trailing comment\n"
            "  has_categories: true\n"
            "- label: 'it''s'\n"
            "  num_fewshot: 3\n"
            "  dataset_uri: x/y.jsonl\n")
    assert cb.parse_core_yaml(text) == [
        {"label": "a", "num_fewshot": [0, 5], "continuation_delimiter": "\nAnswer: ", "has_categories": True},
        {"label": "it's", "num_fewshot": 3, "dataset_uri": "x/y.jsonl"},
    ]
    bad = {
        "icl_tasks:\n-\n  label: a\n  num_fewshot:\n    - 0\n": "t.yaml:4: nested blocks",
        "tasks:\n- label: a\n": "t.yaml:1: expected the top-level key",
        "icl_tasks:\n-\n  label: a\n  label: b\n": "t.yaml:4: duplicate key",
        "icl_tasks:\n-\n  label: \"open\n": "t.yaml:3: cannot parse",
        "icl_tasks:\n-\n\tlabel: a\n": "t.yaml:3: tabs",
        "# nothing\n": "no `icl_tasks:`",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            cb.parse_core_yaml(text, "t.yaml")


def test_load_bundle_toy(toy_bundle):
    tasks, missing = cb.load_bundle(toy_bundle)
    assert [t.label for t in tasks] == ["toy_mc", "toy_schema", "toy_lm"] and missing == ["toy_missing"]
    mc, schema, lm = tasks
    assert (mc.num_fewshot, mc.continuation_delimiter, mc.random_baseline) == (2, " ", 25.0)
    assert (lm.num_fewshot, lm.continuation_delimiter, lm.task_type) == (3, "\nA: ", "language_modeling")
    assert cb.load_task_items(toy_bundle, schema) == SCHEMA_ITEMS


def test_bundle_errors_are_clear(toy_bundle, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CORE eval bundle"):
        cb.load_bundle(str(tmp_path / "nowhere"))
    meta = os.path.join(toy_bundle, "eval_meta_data.csv")
    with open(meta, "w") as f:
        f.write(TOY_META.replace("toy_lm,x,language modeling,3,6,0", "toy_lm,x,language modeling,3,6,abc"))
    with pytest.raises(ValueError, match="toy_lm.*bad random baseline"):
        cb.load_bundle(toy_bundle)
    with open(meta, "w") as f:
        f.write(TOY_META.replace("toy_schema,", "other_schema,"))
    with pytest.raises(ValueError, match="'toy_schema' has no 'Random baseline'"):
        cb.load_bundle(toy_bundle)
    make_toy_bundle(toy_bundle)
    with open(os.path.join(toy_bundle, "core.yaml"), "w") as f:
        f.write(TOY_YAML.replace("icl_task_type: schema", "icl_task_type: generation"))
    with pytest.raises(ValueError, match="'toy_schema' has icl_task_type 'generation'"):
        cb.load_bundle(toy_bundle)
    make_toy_bundle(toy_bundle)
    write_jsonl(os.path.join(toy_bundle, "eval_data", "toy", "mc.jsonl"), MC_ITEMS + [{"query": "q", "choices": ["a", "b"], "gold": 2}])
    with pytest.raises(ValueError, match=r"mc.jsonl:6: gold 2 is not an index"):
        cb.load_task_items(toy_bundle, cb.load_bundle(toy_bundle)[0][0])

# -----------------------------------------------------------------------------
# Prompts

def test_render_multiple_choice():
    items = [{"query": "Q1", "choices": ["x", "y"], "gold": 1}, {"query": "Q2", "choices": ["u", "v", "w"], "gold": 0}]
    t = task("multiple_choice", shots=1, delimiter="\nAnswer: ")
    ctx = "Q1\nAnswer: y\n\nQ2\nAnswer:"  # the delimiter's space moves onto every choice
    assert ce.render_item(t, items, 1) == [(ctx, " u"), (ctx, " v"), (ctx, " w")]
    assert ce.render_item(task("multiple_choice"), items, 0) == [("Q1", " x"), ("Q1", " y")]


def test_render_schema():
    items = [{"context_options": ["A1", "A2"], "continuation": "c1", "gold": 1},
             {"context_options": ["B1", "B2"], "continuation": "c2", "gold": 0}]
    assert ce.render_item(task("schema", shots=1), items, 0) == [("B1 c2\n\nA1", " c1"), ("B1 c2\n\nA2", " c1")]
    assert ce.render_item(task("schema"), items, 1) == [("B1", " c2"), ("B2", " c2")]


def test_render_language_modeling():
    items = [{"context": "C1", "continuation": "k1"}, {"context": "C2", "continuation": "k2"}]
    assert ce.render_item(task("language_modeling", shots=1, delimiter=" = "), items, 1) == [("C1 = k1\n\nC2 =", " k2")]
    assert ce.render_item(task("language_modeling"), items, 0) == [("C1", " k1")]
    assert ce.render_item(task("language_modeling", delimiter=""), items, 0) == [("C1", "k1")]  # nothing to move
    assert ce.render_item(task("language_modeling", delimiter=":\n "), items, 0) == [("C1:", "\n k1")]
    # with k shots, the prompt holds k solved examples, none of them the item itself
    items = [{"context": f"C{i}", "continuation": f"k{i}"} for i in range(20)]
    (ctx, cont), = ce.render_item(task("language_modeling", shots=5), items, 7)
    shots = ctx.split("\n\n")
    assert cont == " k7" and shots[-1] == "C7" and len(shots) == 6
    assert all(s in {f"C{i} k{i}" for i in range(20) if i != 7} for s in shots[:-1])


def test_render_strips_every_field_first():
    """The reference harness strips each row's strings on loading: a query ending in "\n" or "Answer: " and an
    answer ending in " " add no whitespace of their own, in the item and in the few-shot examples alike."""
    mc = [{"query": "Is it?\n", "choices": [" yes ", "no\n"], "gold": 0},
          {"query": "  Why?\nAnswer: ", "choices": ["3", "4"], "gold": 1}]
    ctx = "Why?\nAnswer:\nAnswer: 4\n\nIs it?\nAnswer:"
    t = task("multiple_choice", shots=1, delimiter="\nAnswer: ")
    assert ce.render_item(t, mc, 0) == [(ctx, " yes"), (ctx, " no")]
    lm = [{"context": "The answer is ", "continuation": "\n\nrecorder "}]
    assert ce.render_item(task("language_modeling"), lm, 0) == [("The answer is", " recorder")]
    assert lm[0]["continuation"] == "\n\nrecorder "  # the rows themselves are left as they are
    assert ce.strip_fields({"a": " x ", "b": [" y", 3], "gold": 1}) == {"a": "x", "b": ["y", 3], "gold": 1}


def test_fewshot_deterministic_and_excludes_item():
    for n, k in [(2, 1), (3, 5), (11, 10), (1000, 10)]:
        for idx in range(0, n, max(1, n // 37)):
            picks = ce.sample_fewshot(n, idx, k)
            assert picks == ce.sample_fewshot(n, idx, k)
            assert idx not in picks and len(set(picks)) == len(picks) == min(k, n - 1)
            assert all(0 <= j < n for j in picks)
    assert ce.sample_fewshot(1, 0, 3) == [] and ce.sample_fewshot(50, 3, 0) == []
    assert len({tuple(ce.sample_fewshot(1000, i, 10)) for i in range(20)}) == 20  # seeded per item
    assert sorted(ce.sample_fewshot(11, 4, 10)) == [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]

# -----------------------------------------------------------------------------
# Tokenization, cropping, scoring

def test_tokenize_encodes_context_and_continuation_apart():
    seqs, spans = ce.tokenize_item(ByteTokenizer(), [("ab", " cd"), ("ab", " x")])
    assert seqs[0] == [0, tok("a"), tok("b"), tok(" "), tok("c"), tok("d")] and spans == [(3, 6), (3, 5)]
    # whether the space merges into the next token or not, the span is the continuation's own tokens
    m = MergingTokenizer()
    seqs, spans = ce.tokenize_item(m, [("ab", " cd"), ("ab", " 3")])
    assert seqs == [[0, tok("a"), tok("b"), 257 + 2, tok("d")], [0, tok("a"), tok("b"), tok(" "), tok("3")]]
    assert spans == [(3, 5), (3, 5)]
    with pytest.raises(ValueError, match="no tokens after the context"):
        ce.tokenize_item(ByteTokenizer(), [("ab", "")])

# The span rule with a real BPE (the session tokenizer, trained on tests/fixtures). Byte tokens have their byte
# value as id: 32 ' ', 51 '3', 41 ')', 93 ']'. With this tokenizer ' the', ' Paris' and ' (' are single tokens,
# while a space stays its own token before a digit, a closing bracket and 'X'.
SPACE = 32


def scored_spans(tokenizer, t, items, idx):
    """(sequences, spans, the scored ids of each sequence) for item idx, as evaluate_item builds them."""
    seqs, spans = ce.tokenize_item(tokenizer, ce.render_item(t, items, idx))
    return seqs, spans, [seq[s:e] for seq, (s, e) in zip(seqs, spans)]


def check_plain_text_tokens(tokenizer, seqs):
    """The sequences are BOS + the tokens of their plain text: encoding the pieces apart changed nothing."""
    bos = tokenizer.get_bos_token_id()
    assert all(seq[0] == bos and tokenizer.encode(tokenizer.decode(seq[1:])) == seq[1:] for seq in seqs)


def test_span_language_modeling(tokenizer):
    """The issue's reproduction and its relatives: the delimiter's space is scored with the answer, whether
    or not it merges into the answer's first token (the old rule left an unmerged space in the context and
    scored only ['3'])."""
    rows = [{"context": "Find the length of the longest common subsequence:", "continuation": "3"},
            {"context": "Close the brackets: ( [", "continuation": "] )"},
            {"context": "Open a bracket:", "continuation": "("},
            {"context": "The capital of France is", "continuation": "Paris"},
            {"context": "She played the", "continuation": "Xylophone"}]
    first = [[SPACE, 51], [SPACE, 93, SPACE, 41], tokenizer.encode(" ("), tokenizer.encode(" Paris"), [SPACE, 88]]
    assert [len(f) for f in first] == [2, 4, 1, 1, 2]  # the fixture tokenizer merges ' (' and ' Paris', not the rest
    for t in (task("language_modeling"), task("language_modeling", shots=2, delimiter="\nAnswer: ")):
        for idx, row in enumerate(rows):
            seqs, spans, (got,) = scored_spans(tokenizer, t, rows, idx)
            assert got == tokenizer.encode(" " + row["continuation"]) and got[:len(first[idx])] == first[idx]
            assert tokenizer.decode(got) == " " + row["continuation"] and spans[0][1] == len(seqs[0])
            ctx = tokenizer.decode(seqs[0][1:spans[0][0]])  # the context keeps none of the delimiter's space
            assert ctx.endswith(row["context"] + t.continuation_delimiter.rstrip()) and not ctx[-1].isspace()
            check_plain_text_tokens(tokenizer, seqs)


def test_span_multiple_choice_same_rule_every_choice(tokenizer):
    """Every choice is scored whole, with the delimiter's space, after the same context tokens; a choice that
    is a token-prefix of another (' 34' of ' 345', ' the' of ' theory', ' in' of ' inn') is scored as it is."""
    choices = ["3", "34", "345", "the", "theory", "in", "inn", ")", "(a)", "Xylophone"]
    rows = [{"query": "Question: How many legs does a tripod have?", "choices": choices, "gold": 0},
            {"query": "Question: Pick one.", "choices": ["the", "theory"], "gold": 1}]
    for t in (task("multiple_choice", delimiter="\nAnswer: "), task("multiple_choice", shots=1)):
        seqs, spans, got = scored_spans(tokenizer, t, rows, 0)
        start = spans[0][0]
        assert all(s == start and e == len(seq) and seq[:start] == seqs[0][:start] for seq, (s, e) in zip(seqs, spans))
        assert got == [tokenizer.encode(" " + c) for c in choices]
        assert [tokenizer.decode(g) for g in got] == [" " + c for c in choices]
        assert got[0] == [SPACE, 51] and got[7] == [SPACE, 41] and got[9][:2] == [SPACE, 88]
        assert got[3] == tokenizer.encode(" the") and len(got[3]) == 1 and got[8][0] == tokenizer.encode(" (")[0]
        for short, long in [(1, 2), (3, 4), (5, 6)]:
            assert got[long][:len(got[short])] == got[short] and len(got[long]) > len(got[short])
        check_plain_text_tokens(tokenizer, seqs)


def test_span_schema_scores_only_the_continuation(tokenizer):
    rows = [{"context_options": ["The trophy did not fit in the suitcase because the trophy",
                                 "The trophy did not fit in the suitcase because the suitcase"],
             "continuation": "was too big.", "gold": 0},
            {"context_options": ["Tom had 2 apples and Ann", "Tom had 2 apples and Ben"],
             "continuation": "3 more.", "gold": 1}]
    for t in (task("schema"), task("schema", shots=1)):
        for idx, row in enumerate(rows):
            seqs, spans, got = scored_spans(tokenizer, t, rows, idx)
            assert got == [tokenizer.encode(" " + row["continuation"])] * 2
            assert seqs[0][:spans[0][0]] != seqs[1][:spans[1][0]]  # the options differ, the scored tokens do not
            assert all(e == len(seq) for seq, (_, e) in zip(seqs, spans))
            check_plain_text_tokens(tokenizer, seqs)
        assert got[0][:2] == [SPACE, 51]


def test_crop_keeps_the_scored_span_in_the_window(tokenizer):
    """A prompt longer than the model's context loses its start; the span, space token first, stays whole at
    the end of a window of exactly sequence_len tokens."""
    rows = [{"context": f"Item {i}: " + "words " * 40 + "subsequence:", "continuation": str(i % 10)} for i in range(12)]
    seqs, spans, (got,) = scored_spans(tokenizer, task("language_modeling", shots=10), rows, 3)
    assert len(seqs[0]) > 200 and got == [SPACE, 51]
    (window,), ((s, e),) = ce.crop_left(seqs, spans, 64)
    assert len(window) == 64 and window == seqs[0][-64:] and window[s:e] == [SPACE, 51] and e == 64


def test_crop_left_keeps_continuation_span():
    tk = ByteTokenizer()
    pairs = [("the long context ends with m ", "nop"), ("short t ", "de")]
    seqs, spans = ce.tokenize_item(tk, pairs)
    cropped, cspans = ce.crop_left(seqs, spans, 8)
    assert [len(s) for s in cropped] == [8, 8]
    for seq, (s, e), orig, (os_, oe) in zip(cropped, cspans, seqs, spans):
        assert seq == orig[-8:] and seq[s:e] == orig[os_:oe]
    assert tk.decode(cropped[0][cspans[0][0]:cspans[0][1]]) == "nop"
    short, sspans = ce.crop_left(seqs, spans, 100)
    assert short == seqs and sspans == spans
    # a continuation longer than the window is scored from the second kept token on
    (seq,), ((s, e),) = ce.crop_left([list(range(10))], [(3, 10)], 4)
    assert seq == [6, 7, 8, 9] and (s, e) == (1, 4)
    # the toy model only looks back to the last letter, so cropped scores equal uncropped ones
    model, small = LastLetterModel(), LastLetterModel(sequence_len=8)
    full = ce.score_sequences(model, seqs, spans, 0, "cpu")
    crop = ce.score_sequences(small, cropped, cspans, 0, "cpu")
    assert full == crop and full[0] == pytest.approx([LF, (LN + LF) / 2])


def test_score_sequences_hand_computed_and_padding_free():
    tk, model = ByteTokenizer(), LastLetterModel()
    seqs, spans = ce.tokenize_item(tk, [("a ", "bcd"), ("a ", "bzz"), ("long context k ", "l m")])
    losses, exact = ce.score_sequences(model, seqs, spans, 0, "cpu")
    assert losses == pytest.approx([LF, (LF + 2 * LN) / 3, (2 * LF + LN) / 3], rel=1e-6)
    assert exact == [True, False, False]
    assert model.calls == [(3, max(len(s) for s in seqs))]  # one padded batch
    alone = ce.score_sequences(model, seqs[:1], spans[:1], 0, "cpu")
    assert alone[0][0] == pytest.approx(losses[0], rel=1e-6)

@pytest.mark.parametrize("tied", [False, True])
def test_scoring_head_runs_in_fp32_under_bf16_autocast(tied):
    """Freshly initialized, a GPT's blocks are the identity (zero output projections), so its hidden states are
    fp32 even under bf16 autocast and only the head's precision differs: scoring under autocast must give the
    fp32 losses, while the model's own forward keeps its bf16 head outside the scoring."""
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=64, tie_embeddings=tied))
    model.init_weights()
    with torch.no_grad():
        (model.transformer.wte.weight if tied else model.lm_head.weight).normal_(0.0, 0.5)
    seqs, spans = [list(range(1, 20)), list(range(40, 65))], [(3, 19), (10, 25)]
    ids = torch.tensor([seqs[0]])
    ref, fp32_logits = ce.score_sequences(model, seqs, spans, 0, "cpu"), model(ids)
    precision = torch.get_float32_matmul_precision()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ce.score_sequences(model, seqs, spans, 0, "cpu")
        with ce.fp32_head(model):
            assert (model(ids) - fp32_logits).abs().max() < 1e-4
        bf16_logits = model(ids)
    assert got[0] == pytest.approx(ref[0], abs=1e-5) and got[1] == ref[1]
    assert (bf16_logits - fp32_logits).abs().max() > 1e-3  # the plain forward's head is bf16: what fp32_head avoids
    assert "_head" not in vars(model) and torch.get_float32_matmul_precision() == precision
    assert ce.fp32_head(LastLetterModel()).__enter__() is None  # other models: untouched


# -----------------------------------------------------------------------------
# End to end on the toy bundle

def test_evaluate_core_toy_bundle_hand_computed(toy_bundle):
    model = LastLetterModel()
    model.train()
    out = ce.evaluate_core(model, ByteTokenizer(), toy_bundle)
    assert list(out["results"]) == ["toy_mc", "toy_schema", "toy_lm"] and out["missing"] == ["toy_missing"]
    for label, r in out["results"].items():
        assert r["accuracy"] == pytest.approx(ACC[label]) and r["centered"] == pytest.approx(CENTERED[label])
    assert out["core"] == pytest.approx(CORE)
    assert out["core"] == pytest.approx((7 / 15 + 0.5 + 0.5) / 3)
    # one forward pass per item, one row per choice / option
    batch_sizes = sorted(b for b, _ in model.calls)
    assert batch_sizes == sorted([len(i["choices"]) for i in MC_ITEMS] + [2] * len(SCHEMA_ITEMS) + [1] * len(LM_ITEMS))
    assert model.training  # mode restored


def test_evaluate_core_with_small_context_crops(toy_bundle):
    # the few-shot prompts are longer than 8 tokens, yet the last letter + delimiter + continuation fit
    model = LastLetterModel(sequence_len=8)
    out = ce.evaluate_core(model, ByteTokenizer(), toy_bundle)
    assert max(t for _, t in model.calls) == 8
    assert out["core"] == pytest.approx(CORE)


def test_max_per_task(toy_bundle):
    out = ce.evaluate_core(LastLetterModel(), ByteTokenizer(), toy_bundle, max_per_task=2)
    assert [r["num_items"] for r in out["results"].values()] == [2, 2, 2]
    assert out["max_per_task"] == 2


def test_centered_accuracy_and_aggregation():
    # one convention for CORE and ChatCORE: the baseline is a fraction, as the accuracy is
    assert ce.centered_accuracy(0.25, 0.25) == pytest.approx(0.0)
    assert ce.centered_accuracy(1.0, 0.25) == pytest.approx(1.0)
    assert ce.centered_accuracy(0.6, 0.5) == pytest.approx(0.2)
    assert ce.centered_accuracy(0.1, 0.5) == pytest.approx(-0.8)
    assert ce.centered_accuracy(0.3, 0) == pytest.approx(0.3)
    assert ce.centered_accuracy(0.552294, 0.62) == pytest.approx(-0.178174, abs=1e-6)  # GPT-2's published boolq


def test_centered_accuracy_refuses_a_percent_baseline(toy_bundle):
    """eval_meta_data.csv gives baselines in percent; passed as they are, every task would center to about
    -acc / 24 (baseline 25 -> (acc - 25) / -24). The metric refuses them, and evaluate_core converts."""
    for percent in (25, 62.0, 1.0):
        with pytest.raises(ValueError, match="not a fraction in \\[0, 1\\).*divided by 100"):
            ce.centered_accuracy(0.5, percent)
    out = ce.evaluate_core(LastLetterModel(), ByteTokenizer(), toy_bundle)
    for label, r in out["results"].items():  # the result keeps the CSV's percent, the centering used a fraction
        assert r["centered"] == pytest.approx(ce.centered_accuracy(r["accuracy"], r["random_baseline"] / 100))
    assert out["results"]["toy_mc"]["random_baseline"] == 25.0


def test_outputs_table_csv_report(toy_bundle, tmp_path, monkeypatch):
    from scripts import base_eval
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    out = ce.evaluate_core(LastLetterModel(), ByteTokenizer(), toy_bundle)
    table = base_eval.format_results_table(out)
    assert "toy_schema" in table and f"{CORE:.4f}" in table and "missing tasks (not in CORE): toy_missing" in table
    path = base_eval.write_results_csv(out, "../d4 step/5")
    assert os.path.dirname(path) == str(tmp_path / "base" / "base_eval") and os.path.basename(path).startswith("core_")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [r["Task"] for r in rows] == ["toy_mc", "toy_schema", "toy_lm", "toy_missing", "CORE"]
    assert float(rows[1]["Accuracy"]) == pytest.approx(0.75) and rows[3]["Status"] == "missing"
    assert float(rows[-1]["Centered"]) == pytest.approx(CORE, abs=1e-6)
    report = base_eval.write_report(out, {"model": "toy"})
    text = open(report).read()
    assert text.startswith("## Base model evaluation") and "toy_missing" in text and f"{CORE:.4f}" in text
    assert "| toy_lm | language_modeling | 3 | 6 | 0.5000 | 0.5000 |" in text


def test_distributed_two_gloo_ranks(toy_bundle, tmp_path):
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workers", "core_eval_worker.py")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           worker, toy_bundle, str(tmp_path)], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    total = len(MC_ITEMS) + len(SCHEMA_ITEMS) + len(LM_ITEMS)
    assert [o["world_size"] for o in outs] == [2, 2]
    assert sum(o["forward_calls"] for o in outs) == total and all(o["forward_calls"] < total for o in outs)
    for o in outs:  # every rank holds the reduced totals
        assert o["core"] == pytest.approx(CORE)
        assert {k: r["accuracy"] for k, r in o["results"].items()} == pytest.approx(ACC)

# -----------------------------------------------------------------------------
# The real bundle in ../shared/data

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class TiktokenGPT2:
    """The GPT-2 BPE (r50k_base) behind the interface core_eval expects."""

    def __init__(self, path):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
        self.enc = tiktoken.Encoding("r50k_test", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(path),
                                     special_tokens={"<|endoftext|>": 50256})

    def get_bos_token_id(self):
        return 50256

    def encode(self, text, prepend=None, append=None):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        return ([prepend] if prepend is not None else []) + self.enc.encode_ordinary(text) + ([append] if append is not None else [])

    def decode(self, ids):
        return self.enc.decode(ids)


def test_real_bundle_tasks_and_prompts():
    from conftest import require_shared_data
    eval_dir = require_shared_data("eval", "core")
    tasks, missing = cb.load_bundle(eval_dir)
    assert len(tasks) == 20 and missing == ["squad", "coqa"]
    by_label = {t.label: t for t in tasks}
    assert by_label["boolq"].random_baseline == 62 and by_label["jeopardy"].continuation_delimiter == "\nAnswer: "
    assert {t.task_type for t in tasks} == set(cb.TASK_TYPES)
    assert by_label["jeopardy"].num_fewshot == 10 and by_label["winograd"].task_type == "schema"
    for t in tasks:  # every row of every present task validates and renders
        items = cb.load_task_items(eval_dir, t)
        pairs = ce.render_item(t, items, len(items) - 1)
        assert len(pairs) == len(items[-1].get("choices", items[-1].get("context_options", [0])))

    copa = cb.load_task_items(eval_dir, by_label["copa"])
    ctx = "The man turned on the faucet, therefore"
    assert ce.render_item(by_label["copa"], copa, 0) == [(ctx, " the toilet filled with water."), (ctx, " water flowed from the spout.")]

    wsc = cb.load_task_items(eval_dir, by_label["winograd"])
    start = "The city councilmen refused the demonstrators a permit because the "
    assert ce.render_item(by_label["winograd"], wsc, 0) == [(start + "city councilmen", " feared violence."),
                                                             (start + "demonstrators", " feared violence.")]

    jeopardy = cb.load_task_items(eval_dir, by_label["jeopardy"])
    (ctx, cont), = ce.render_item(by_label["jeopardy"], jeopardy, 0)
    item = "WORLD HISTORY: This Navy commander flew from a base at Little America to the South Pole & back Nov. 28-29, 1929"
    assert cont == " Admiral Richard Byrd" and ctx.endswith("\n\n" + item + "\nAnswer:")
    assert ctx.count("\nAnswer: ") == 10 and not ctx.startswith(item)

    piqa = cb.load_task_items(eval_dir, by_label["piqa"])  # every query ends in "\n": stripped, as the reference does
    assert piqa[0]["query"].endswith("?\n") and ce.render_item(by_label["piqa"], piqa, 0)[0][0].endswith("?\nAnswer:")

    # with the real GPT-2 BPE the spans hold exactly the continuation (the space merged into it)
    tk = TiktokenGPT2(require_shared_data("tokenizers", "tiktoken", "r50k_base.tiktoken"))
    for t, items, idx, expect in [(by_label["copa"], copa, 0, [" the toilet filled with water.", " water flowed from the spout."]),
                                  (by_label["winograd"], wsc, 0, [" feared violence."] * 2),
                                  (by_label["jeopardy"], jeopardy, 0, [" Admiral Richard Byrd"])]:
        seqs, spans = ce.tokenize_item(tk, ce.render_item(t, items, idx))
        assert all(seq[0] == 50256 for seq in seqs)
        assert [tk.decode(seq[s:e]) for seq, (s, e) in zip(seqs, spans)] == expect

# -----------------------------------------------------------------------------
# Downloading the bundle from a local server

class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path == "/truncated.zip":  # promise more bytes than are sent
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"PK\x03\x04 only the start")
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(root=root, url=f"http://127.0.0.1:{httpd.server_address[1]}", hits=httpd.hits)
    httpd.shutdown()
    httpd.server_close()


def _bundle_files(bundle):
    for dirpath, _, files in os.walk(bundle):
        for name in files:
            path = os.path.join(dirpath, name)
            yield path, os.path.relpath(path, bundle).replace(os.sep, "/")


def make_zip(path, bundle, prefix=""):
    with zipfile.ZipFile(path, "w") as zf:
        for full, rel in _bundle_files(bundle):
            zf.write(full, prefix + rel)


def make_targz(path, bundle, prefix=""):
    with tarfile.open(path, "w:gz") as tf:
        for full, rel in _bundle_files(bundle):
            tf.add(full, prefix + rel)


def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.endswith(".tmp")]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_download_bundle(kind, server, toy_bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    if kind == "zip":
        make_zip(server.root / "core.zip", toy_bundle, prefix="eval_bundle/")  # nested one folder down
    else:
        make_targz(server.root / "core.tar.gz", toy_bundle)  # flat
    url = f"{server.url}/core.{kind}"
    monkeypatch.setenv(cb.EVAL_BUNDLE_URL_ENV, url)
    dest = cb.resolve_eval_dir(None)
    assert dest == str(tmp_path / "base" / "eval_bundle") and cb.is_bundle_dir(dest)
    assert cb.load_bundle(dest)[1] == ["toy_missing"]
    assert ce.evaluate_core(LastLetterModel(), ByteTokenizer(), dest)["core"] == pytest.approx(CORE)
    assert _leftovers(tmp_path / "base") == []
    # already there: no second download
    assert cb.download_eval_bundle() == dest and server.hits == [f"/core.{kind}"]


def test_download_failures_leave_nothing(server, toy_bundle, tmp_path):
    dest = str(tmp_path / "out" / "eval_bundle")
    (server.root / "corrupt.zip").write_bytes(b"PK\x03\x04" + os.urandom(300))
    (server.root / "random.tar.gz").write_bytes(os.urandom(300))
    make_targz(server.root / "full.tar.gz", toy_bundle)
    data = (server.root / "full.tar.gz").read_bytes()
    (server.root / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    no_yaml = tmp_path / "no_yaml"
    make_toy_bundle(no_yaml)
    os.remove(no_yaml / "core.yaml")
    make_zip(server.root / "no_yaml.zip", no_yaml)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../core.yaml", "icl_tasks:\n")
        zf.writestr("../eval_meta_data.csv", TOY_META)
    (server.root / "escape.zip").write_bytes(buf.getvalue())
    cases = {
        "missing.zip": "HTTP 404",
        "truncated.zip": "failed|cut short",
        "corrupt.zip": "not a valid zip or tar.gz archive",
        "random.tar.gz": "not a valid zip or tar.gz archive",
        "cut.tar.gz": "not a valid zip or tar.gz archive",
        "no_yaml.zip": "no folder holding core.yaml",
        "escape.zip": "unsafe path",
    }
    for name, message in cases.items():
        with pytest.raises(RuntimeError, match=message):
            cb.download_eval_bundle(f"{server.url}/{name}", dest)
        assert not os.path.exists(dest) and _leftovers(tmp_path / "out") == [], name
    with pytest.raises(RuntimeError, match="failed"):
        cb.download_eval_bundle("http://127.0.0.1:9/none.zip", dest, timeout=5)  # nothing listens on port 9


def test_no_url_and_bad_eval_dir_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv(cb.EVAL_BUNDLE_URL_ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"--eval-dir.*NANOCHAT_EVAL_BUNDLE_URL"):
        cb.resolve_eval_dir(None)
    with pytest.raises(FileNotFoundError, match="is not a CORE eval bundle"):
        cb.resolve_eval_dir(str(tmp_path))
    (tmp_path / "base" / "eval_bundle").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="exists but is not a CORE eval bundle"):
        cb.download_eval_bundle("http://127.0.0.1:9/x.zip")

# -----------------------------------------------------------------------------
# The script

def test_base_eval_script(toy_bundle, tmp_path, monkeypatch, capsys):
    from scripts import base_eval
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    with pytest.raises(SystemExit):
        base_eval.get_parser().parse_args(["--max-per-task=0"])
    assert "--max-per-task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        base_eval.get_parser().parse_args(["--no-such-flag=1"])
    calls = []

    def load_model(source, device, phase="eval", model_tag=None, step=None):
        calls.append((source, phase, model_tag, step))
        return LastLetterModel(), ByteTokenizer(), {"step": 5}

    monkeypatch.setitem(sys.modules, "nanochat.checkpoint", types.SimpleNamespace(load_model=load_model))
    out = base_eval.main([f"--eval-dir={toy_bundle}", "--model-tag=d4", "--device-type=cpu"])
    assert calls == [("base", "eval", "d4", None)]
    assert out["core"] == pytest.approx(CORE)
    printed = capsys.readouterr().out
    assert "CORE" in printed and "toy_missing" in printed
    assert os.path.isfile(tmp_path / "base" / "base_eval" / "core_d4_step000005.csv")
    assert os.path.isfile(tmp_path / "base" / "report" / "base-model-evaluation.md")


def test_base_train_core_metric_uses_the_default_bundle(toy_bundle, tokenizer, monkeypatch, capsys):
    """--core-metric-every without --eval-dir evaluates the bundle in $NANOCHAT_BASE_DIR/eval_bundle (it was
    passed on as None and crashed); a missing bundle with no download URL stops the run before it trains, naming
    --eval-dir."""
    import shutil
    from conftest import FIXTURE_TEXT
    from nanochat.common import get_base_dir
    from scripts import base_train
    flags = ["--depth=1", "--max-seq-len=32", "--device-batch-size=2", "--total-batch-size=64", "--num-iterations=1",
             "--eval-every=-1", "--eval-tokens=64", "--sample-every=-1", "--core-metric-every=1",
             "--core-metric-max-per-task=2", f"--data={FIXTURE_TEXT}", "--model-tag=core_default"]
    monkeypatch.delenv(cb.EVAL_BUNDLE_URL_ENV, raising=False)
    dest = os.path.join(get_base_dir(), "eval_bundle")
    shutil.rmtree(dest, ignore_errors=True)
    with pytest.raises(SystemExit, match="^base_train: CORE bundle: no CORE eval bundle at .*--eval-dir"):
        base_train.main(flags)
    assert "step 00001" not in capsys.readouterr().out  # nothing was trained
    shutil.copytree(toy_bundle, dest)
    try:
        base_train.main(flags)
    finally:
        shutil.rmtree(dest)
    out = capsys.readouterr().out
    assert "CORE toy_lm" in out and "| CORE " in out
