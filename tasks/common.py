"""
The base of every task: an indexable list of conversations plus a way to score a completion.

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": str | [parts]}], ...}
where a part is {"type": "text"|"python"|"python_output", "text": str}. Categorical (multiple-choice)
tasks also carry conversation["letters"], and the assistant's reply is the gold letter.

    task = GSM8K(split="test", start=0, stop=100)   # a view: the first 100 test problems
    len(task), task[0], task.evaluate(task[0], "... #### 72")
    mix = TaskMixture([GSM8K(split="train"), MMLU(split="dev"), MMLU(split="dev")])  # dev twice: upweighted
"""
import bisect
import gzip
import json
import os
import random

# -----------------------------------------------------------------------------
# Where the task data lives

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_data_dir():
    """$NANOCHAT_DATA_DIR, else the shared data folder next to the repo (../shared/data)."""
    return os.environ.get("NANOCHAT_DATA_DIR") or os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")


def data_path(*parts, path=None, what="task data"):
    """`path` if given, else get_data_dir()/parts...; a clear FileNotFoundError when it does not exist."""
    full = path if path is not None else os.path.join(get_data_dir(), *parts)
    if not os.path.exists(full):
        raise FileNotFoundError(
            f"{what} not found at {full}. Pass its location explicitly (path=...), point NANOCHAT_DATA_DIR at a "
            f"folder holding {'/'.join(parts) or 'it'}, or fetch it with `python -m tasks.download`.")
    return full


def open_text(path):
    """Open a text file for reading, transparently gunzipping *.gz."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path):
    """List of the JSON objects in a .jsonl or .jsonl.gz file; errors name the file and line."""
    rows = []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
    return rows

# -----------------------------------------------------------------------------
# Conversations

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")


def validate_conversation(conversation):
    """Raise ValueError unless the conversation is well formed: an optional leading system message, then
    user/assistant alternating, starting with user; content a non-empty string or a list of parts (parts
    only for the assistant)."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation must be a dict with a "messages" list')
    messages = conversation["messages"]
    if not messages:
        raise ValueError("a conversation needs at least one message")
    start = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    if start == len(messages):
        raise ValueError("a conversation needs a user message after the system message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or set(msg) - {"role", "content"} or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i}: must be a dict with exactly 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {ROLES}")
        if i >= start:
            expected = "user" if (i - start) % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"message {i}: expected role {expected!r} (user and assistant alternate, "
                                 f"starting with user), got {role!r}")
        if isinstance(content, str):
            if not content:
                raise ValueError(f"message {i}: empty content")
        elif isinstance(content, list):
            if role != "assistant":
                raise ValueError(f"message {i}: only assistant messages may have a list of parts")
            if not content:
                raise ValueError(f"message {i}: empty list of parts")
            for j, part in enumerate(content):
                if (not isinstance(part, dict) or part.get("type") not in PART_TYPES
                        or not isinstance(part.get("text"), str)):
                    raise ValueError(f"message {i} part {j}: must be {{'type': one of {PART_TYPES}, 'text': str}}")
        else:
            raise ValueError(f"message {i}: content must be a str or a list of parts")
    return conversation


def content_text(content):
    """The plain text of a message's content (parts joined, tool calls and outputs included as their text)."""
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)

# -----------------------------------------------------------------------------
# Multiple choice

LETTERS = "ABCDEFGHIJ"


def render_mc(question, choices, letters=None):
    """The user message of a multiple-choice question: the choices listed with letters, and an instruction
    to answer with just the letter, so the assistant's reply is a single letter token."""
    letters = letters or LETTERS[:len(choices)]
    assert len(letters) == len(choices), "one letter per choice"
    lines = [question.strip(), ""]
    lines += [f"{letter}. {str(choice).strip()}" for letter, choice in zip(letters, choices)]
    lines += ["", f"Answer with the letter of the correct choice ({', '.join(letters[:-1])} or {letters[-1]})."]
    return "\n".join(lines)


def mc_conversation(question, choices, gold, **extra):
    """A categorical conversation: the rendered question, the gold letter as the reply, and the letters."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices")
    letters = list(LETTERS[:len(choices)])
    conversation = {"messages": [{"role": "user", "content": render_mc(question, choices, letters)},
                                 {"role": "assistant", "content": letters[gold]}],
                    "letters": letters}
    conversation.update(extra)
    return conversation

# -----------------------------------------------------------------------------
# Tasks and their combinators


class Task:
    """A view over a dataset: subclasses implement num_examples() and get_example(i) over the full data,
    and evaluate(conversation, completion). The view optionally shuffles the rows with `seed` (the same
    seed gives the same order everywhere) and then keeps rows [start:stop:step] of that order."""

    eval_type = "generative"  # or "categorical"

    def __init__(self, start=0, stop=None, step=1, seed=None):
        if step <= 0 or start < 0 or (stop is not None and stop < start):
            raise ValueError(f"bad slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step, self.seed = start, stop, step, seed
        self._indices = None

    @property
    def indices(self):
        if self._indices is None:  # computed on first use: subclasses load their data after super().__init__
            order = list(range(self.num_examples()))
            if self.seed is not None:
                random.Random(self.seed).shuffle(order)
            self._indices = order[self.start:self.stop:self.step]
        return self._indices

    def num_examples(self):
        raise NotImplementedError

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

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def _check_tasks(tasks):
    tasks = list(tasks)
    if not tasks or not all(isinstance(t, (Task, TaskMixture, TaskSequence)) for t in tasks):
        raise ValueError("expected a non-empty list of tasks")
    return tasks


class TaskMixture:
    """All examples of several tasks, shuffled together deterministically. List a task twice to see its
    examples twice (upweighting)."""

    def __init__(self, tasks, seed=42):
        self.tasks = _check_tasks(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        t, j = self.index[i]
        return self.tasks[t][j]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskSequence:
    """Tasks one after another, in order (a curriculum)."""

    def __init__(self, tasks):
        self.tasks = _check_tasks(tasks)
        self.offsets = []
        total = 0
        for task in self.tasks:
            self.offsets.append(total)
            total += len(task)
        self.total = total

    def __len__(self):
        return self.total

    def __getitem__(self, i):
        if i < 0:
            i += self.total
        if not 0 <= i < self.total:
            raise IndexError(f"TaskSequence index out of range for {self.total} examples")
        t = bisect.bisect_right(self.offsets, i) - 1  # the last task starting at or before i (never an empty one)
        return self.tasks[t][i - self.offsets[t]]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
