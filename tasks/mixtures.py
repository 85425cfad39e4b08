"""
The named training mixtures of the chat stages (midtraining and SFT), in one place.

A mixture is a list of sources, each with a weight per stage. A weight is how many times each of the
source's training rows appears in one epoch: 2 = every row twice, 0.25 = a quarter of its rows (a
different random quarter each epoch), 0 = not used in that stage. Sources:

    a shared chat file by name     <data dir>/chat/<name>.jsonl.gz (tasks.chat.ChatTask)
    gsm8k-train                    GSM8K train split, answers as calculator tool calls (tasks.gsm8k)
    mmlu-dev                       MMLU dev split (5 questions x 57 subjects) as multiple choice (tasks.mmlu)
    identity                       tasks/identity_conversations.jsonl: who the model is (tasks.identity)
    a path                         your own {"messages": [...]} JSONL(.gz), via --extra-data=PATH:WEIGHT

What never goes into training: the evaluation splits. Chat evaluation scores ARC-Easy/ARC-Challenge test
(the only ARC split there is, so ARC is not trained on at all), MMLU test, GSM8K test and HumanEval. Training
uses MMLU dev and GSM8K train only, and every training row whose first user message opens with the
question of an evaluation problem (ARC, MMLU test, GSM8K test) is dropped ("decontamination": 5 MMLU dev
questions reappear in MMLU test, and Dolly's "why is the sky blue?" is also an evaluation question).
A mixture can also drop every conversation that holds code (english-chat does).

Every source also gives up a fixed validation slice (VAL_FRACTION of its rows, at most VAL_MAX): a seeded
shuffle of the source's rows whose first rows are held out. The slice depends only on the source's rows,
never on the stage, the weights or the run seed, so midtraining and SFT are validated on the same
conversations and held-out loss compares across stages.
"""
import functools
import itertools
import random
import re
from dataclasses import dataclass

from nanochat.dataset import parse_weighted_path
from tasks.common import content_text

VAL_FRACTION = 0.02
VAL_MAX = 250
HOLDOUT_SEED = 20240601  # fixed forever: changing it changes every validation slice


@dataclass(frozen=True)
class Source:
    name: str
    mid: float  # weight in midtraining
    sft: float  # weight in SFT
    note: str = ""


@dataclass(frozen=True)
class MixtureDef:
    summary: str
    sources: tuple
    drop_code: bool = False  # drop conversations that hold code (see looks_like_code) from the named sources


# Weights: midtraining sees (nearly) all the conversation data once, to learn the format, turn taking,
# multiple choice and tool use; SFT is a smaller, cleaner pass: the narrow task-oriented SGD dialogues are
# cut to a tenth, the human-written instructions and the identity conversations are upweighted.
REFERENCE_SOURCES = (
    Source("sgd_dialogues", 1.0, 0.1, "multi-turn task-oriented dialogues"),
    Source("dolly_hhrlhf_small", 1.0, 1.0, "single-turn questions and answers"),
    Source("gpteacher_roleplay", 1.0, 1.0, "role-play instructions"),
    Source("gpteacher_codegen", 1.0, 0.25, "code generation"),
    Source("alpaca_seed_tasks", 1.0, 2.0, "human-written instructions"),
    Source("self_instruct_user_oriented", 1.0, 2.0, "human-written instructions"),
    Source("mmlu-dev", 4.0, 2.0, "multiple choice (MMLU dev; never MMLU test or ARC)"),
    Source("gsm8k-train", 1.0, 0.5, "math with calculator tool calls (GSM8K train)"),
    Source("identity", 4.0, 8.0, "who the model is"),
)
DRILLS = ("gpteacher_codegen", "mmlu-dev", "gsm8k-train")  # what english-chat leaves out of the reference
MIXTURES = {
    "reference": MixtureDef("general chat + multiple-choice questions + GSM8K with calculator tool calls + identity",
                            REFERENCE_SOURCES),
    "english-chat": MixtureDef("conversation only: no math, no code, no multiple-choice drills; identity kept",
                               tuple(s for s in REFERENCE_SOURCES if s.name not in DRILLS), drop_code=True),
}
# Left out of both on purpose (add them with --extra-data=NAME:WEIGHT if you want them); --help lists them.
# The toolformer replies call tools as text ("wikipedia('...')"), not in the real tool format.
EXCLUDED = {"gpteacher_toolformer": "made-up textual tool calls that nothing executes",
            "hh_rlhf_harmless_base_test": "red-team transcripts; the replies are not good behaviour"}
STAGES = ("mid", "sft")


def describe_mixtures():
    """Text for --help: every named mixture with its sources and weights."""
    lines = []
    for name, mix in MIXTURES.items():
        lines.append(f"{name}: {mix.summary}{' (rows holding code dropped)' if mix.drop_code else ''}")
        lines += [f"    {s.name:<28} mid x{s.mid:<5g} sft x{s.sft:<5g} {s.note}" for s in mix.sources]
    lines += ["left out of both: " + "; ".join(f"{k} ({v})" for k, v in EXCLUDED.items()),
              "weights: how many times each training row of a source appears per epoch (0.25 = a quarter of them)"]
    return "\n".join(lines)


def load_source(name):
    """The Task behind a source name (see the module docstring)."""
    if name == "gsm8k-train":
        from tasks.gsm8k import GSM8K
        return GSM8K(split="train")
    if name == "mmlu-dev":
        from tasks.mmlu import MMLU
        return MMLU(split="dev")
    if name == "identity":
        from tasks.identity import IdentityTask
        return IdentityTask()
    from tasks.chat import ChatTask
    return ChatTask(name)


def parse_extra_data(spec):
    """'PATH[:WEIGHT],...' -> [(path, weight)]; weight defaults to 1, empty entries are skipped. ValueError
    (nanochat.dataset.DataError) on a bad weight: the syntax is --data's, parsed by the same function."""
    return [parse_weighted_path(item.strip(), "--extra-data entry") for item in (spec or "").split(",") if item.strip()]


def holdout_split(n):
    """(train indices, val indices) of a source with n rows: fixed, whatever the stage or run."""
    order = list(range(n))
    random.Random(HOLDOUT_SEED).shuffle(order)
    n_val = 0 if n < 2 else min(VAL_MAX, max(1, round(VAL_FRACTION * n)))
    return sorted(order[n_val:]), sorted(order[:n_val])

# -----------------------------------------------------------------------------
# Decontamination against the evaluation sets


def question_key(text):
    """What identifies a question: the first paragraph of a user message, lowercased, whitespace collapsed
    (a multiple-choice rendering appends its choices after a blank line)."""
    first = text.strip().split("\n\n")[0]
    return re.sub(r"\s+", " ", first).strip().lower()


def first_user_text(conversation):
    return next((content_text(m["content"]) for m in conversation["messages"] if m["role"] == "user"), "")


@functools.cache
def eval_question_keys():
    """question_key of every problem the chat evaluation scores (ARC test, MMLU test, GSM8K test), for the
    sets whose data exists (a missing set cannot leak)."""
    from tasks.registry import load_task
    keys = set()
    for name in ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K"):
        try:
            task = load_task(name)
        except FileNotFoundError:
            continue
        keys.update(question_key(first_user_text(c)) for c in task)
    return frozenset(k for k in keys if k)


# A line that only code has: a definition, an import, a C-like block or statement, a shebang.
_CODE_LINE = re.compile(
    r"^\s*(def \w+\(|class \w+.*:\s*$|import \w|from [\w.]+ import |#include|#!/|public |private |"
    r"function\s*\w*\s*\(|(const|let|var) \w+ *=|for \w+ in .*:\s*$|for\s*\(|while\s*\(|if\s*\(.*\)\s*\{|"
    r"print\(|console\.log|return\b.*;\s*$|SELECT\b.*\bFROM\b|\}\s*;?\s*$|.*\{\s*$)", re.MULTILINE)


def looks_like_code(conversation):
    """True when any message has a code fence or at least two lines that only code has."""
    texts = (content_text(m["content"]) for m in conversation["messages"])
    return any("```" in text or len(_CODE_LINE.findall(text)) >= 2 for text in texts)

# -----------------------------------------------------------------------------


class Mixture:
    """Training and validation rows over several sources. A row reference is (source index, row index)."""

    def __init__(self, entries, decontaminate=True):
        """entries: [(name, task, weight)] or [(name, task, weight, drop_code)]; weight 0 entries are dropped.
        Training rows that repeat an evaluation question (decontaminate) or hold code (drop_code) are dropped;
        rows holding code are dropped from the validation slice too (drop_code)."""
        self.names, self.tasks, self.weights, self.train, self.val, self.dropped = [], [], [], [], [], []
        eval_keys = eval_question_keys() if decontaminate else frozenset()
        for name, task, weight, *rest in entries:
            drop_code = bool(rest and rest[0])
            if weight <= 0:
                continue
            train, val = holdout_split(len(task))
            clean = [i for i in train if not (question_key(first_user_text(task[i])) in eval_keys
                                              or (drop_code and looks_like_code(task[i])))]
            if drop_code:
                val = [i for i in val if not looks_like_code(task[i])]
            if not clean:
                raise ValueError(f"mixture source {name!r} has no training rows")
            self.names.append(name)
            self.tasks.append(task)
            self.weights.append(float(weight))
            self.train.append(clean)
            self.val.append(val)
            self.dropped.append(len(train) - len(clean))
        if not self.names:
            raise ValueError("the mixture has no sources")

    def rows_per_epoch(self, s):
        return round(self.weights[s] * len(self.train[s]))

    def __len__(self):
        """Training rows in one epoch."""
        return sum(self.rows_per_epoch(s) for s in range(len(self.names)))

    def epoch_rows(self, epoch, seed=0):
        """The shuffled row references of one epoch (a fractional weight picks a fresh subset each epoch)."""
        rng = random.Random(f"mixture:{seed}:{epoch}")
        rows = []
        for s, (train, w) in enumerate(zip(self.train, self.weights)):
            whole = int(w)
            rows += [(s, i) for i in train] * whole
            extra = self.rows_per_epoch(s) - whole * len(train)
            rows += [(s, i) for i in rng.sample(train, extra)] if extra > 0 else []
        rng.shuffle(rows)
        return rows

    def val_rows(self, limit=None):
        """Held-out row references of every source, interleaved round-robin so that any prefix covers
        every source; the first `limit` of them."""
        rounds = itertools.zip_longest(*[[(s, i) for i in v] for s, v in enumerate(self.val)])
        return [ref for refs in rounds for ref in refs if ref is not None][:limit]

    def get(self, ref):
        s, i = ref
        return self.tasks[s][i]

    def summary(self):
        """Markdown table: source, weight, training rows, rows per epoch, held out, dropped as contaminated."""
        lines = ["| source | weight | train rows | rows/epoch | held out | filtered out |", "|---|---|---|---|---|---|"]
        for s, name in enumerate(self.names):
            lines.append(f"| {name} | {self.weights[s]:g} | {len(self.train[s]):,} | {self.rows_per_epoch(s):,} | "
                         f"{len(self.val[s]):,} | {self.dropped[s]:,} |")
        lines.append(f"| total | | {sum(map(len, self.train)):,} | {len(self):,} | {sum(map(len, self.val)):,} | "
                     f"{sum(self.dropped):,} |")
        return "\n".join(lines)


def build_mixture(name, stage, extra_data=None):
    """The named mixture with the stage's weights (stage 'mid' or 'sft'), plus --extra-data sources.
    FileNotFoundError/ValueError with a clear message on missing or bad data."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if name not in MIXTURES:
        raise ValueError(f"unknown mixture {name!r}; choose from {', '.join(MIXTURES)}")
    mix = MIXTURES[name]
    named = {s.name for s in mix.sources}
    entries = [(s.name, getattr(s, stage)) for s in mix.sources] + parse_extra_data(extra_data)
    weights = {}  # a source named twice (e.g. a shared file added again by --extra-data) adds its weights
    for n, w in entries:
        weights[n] = weights.get(n, 0.0) + w
    # the code filter is the mixture's promise about its own sources; the user's own files are taken as given
    return Mixture([(n, load_source(n), w, mix.drop_code and n in named) for n, w in weights.items() if w > 0])
