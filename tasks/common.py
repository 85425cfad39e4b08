"""
The base of every task: an indexable list of conversations plus a way to score a completion.

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": str | [parts]}], ...}
where a part is {"type": "text"|"python"|"python_output", "text": str}. Categorical (multiple-choice)
tasks also carry conversation["letters"], and the assistant's reply is the gold letter.

    task = GSM8K(split="test", start=0, stop=100)   # a view: the first 100 test problems
    len(task), task[0], task.evaluate(task[0], "... #### 72")

Training mixes tasks with tasks.mixtures (weights per stage, held-out slices, decontamination).
"""
import functools
import os
import random

# the conversation format and its one validator (shared with the tokenizer and the web server), re-exported:
# the tasks check their data files with it (strict, the default)
from nanochat.common import read_jsonl  # noqa: F401  (the tasks read their rows with it)
from nanochat.conversation import content_text, validate_conversation  # noqa: F401

# -----------------------------------------------------------------------------
# Where the task data lives

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_task_data_dir():
    """The folder of the task data (chat/ and eval/): $NANOCHAT_DATA_DIR, else the shared data folder next
    to the repo (../shared/data). Not the pretraining shards (nanochat.dataset.get_shard_dir)."""
    return os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def data_path(*parts, path=None, what="task data"):
    """`path` if given, else get_task_data_dir()/parts...; a clear FileNotFoundError when it does not exist."""
    full = path if path is not None else os.path.join(get_task_data_dir(), *parts)
    if not os.path.exists(full):
        raise FileNotFoundError(
            f"{what} not found at {full}. Pass its location explicitly (path=...), point NANOCHAT_DATA_DIR at a "
            f"folder holding {'/'.join(parts) or 'it'}, or fetch it with `python -m tasks.download`.")
    return full


# -----------------------------------------------------------------------------
# Multiple choice

LETTERS = "ABCDEFGHIJ"


def render_mc(question, choices):
    """The user message of a multiple-choice question: the choices listed with letters, and an instruction
    to answer with just the letter, so the assistant's reply is a single letter token."""
    letters = LETTERS[:len(choices)]
    options = [f"{letter}. {str(choice).strip()}" for letter, choice in zip(letters, choices)]
    return "\n".join([question.strip(), "", *options, "",
                      f"Answer with the letter of the correct choice ({', '.join(letters[:-1])} or {letters[-1]})."])


def mc_conversation(question, choices, gold, **extra):
    """A categorical conversation: the rendered question, the gold letter as the reply, and the letters."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    letters = list(LETTERS[:len(choices)])
    return {"messages": [{"role": "user", "content": render_mc(question, choices)},
                         {"role": "assistant", "content": letters[gold]}],
            "letters": letters, **extra}

# -----------------------------------------------------------------------------
# Tasks


class Task:
    """A view over a dataset: subclasses implement get_example(i) over the full data (kept in self.rows, or
    override num_examples()) and evaluate(conversation, completion). The view optionally shuffles the rows
    with `seed` (the same seed gives the same order everywhere) and then keeps rows [start:stop:step] of that
    order. Iterating goes through __getitem__."""

    eval_type = "generative"  # or "categorical"

    def __init__(self, start=0, stop=None, step=1, seed=None):
        if step <= 0 or start < 0 or (stop is not None and stop < start):
            raise ValueError(f"bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step, self.seed = start, stop, step, seed

    @functools.cached_property
    def indices(self):  # computed on first use: subclasses load their data after super().__init__
        order = list(range(self.num_examples()))
        if self.seed is not None:
            random.Random(self.seed).shuffle(order)
        return order[self.start:self.stop:self.step]

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, completion):
        raise NotImplementedError(f"{type(self).__name__} has no automatic evaluation")

    def reward(self, conversation, completion):
        """Scalar reward for RL; by default 1.0 when evaluate() says correct."""
        return float(self.evaluate(conversation, completion))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"{type(self).__name__} index {i} out of range for {len(self)} examples")
        return self.get_example(self.indices[i])


class MultipleChoiceTask(Task):
    """Conversations built by mc_conversation, scored by the predicted letter."""

    eval_type = "categorical"

    def evaluate(self, conversation, completion):
        """`completion` is the predicted letter."""
        return completion.strip() == conversation["messages"][-1]["content"]
