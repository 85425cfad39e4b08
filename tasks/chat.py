"""
Conversations from JSONL files, one {"messages": [...]} per line (optionally gzipped): the shared chat data
(<data dir>/chat/*.jsonl.gz, picked by name) or any file of your own. Every row is validated on load and a
bad one is reported with its file and line. There is nothing to score: these are for training mixes.
"""
import os

from tasks.common import Task, data_path, read_jsonl, validate_conversation, get_task_data_dir


def shared_chat_files():
    """Names of the chat files in the shared data folder (without .jsonl.gz)."""
    folder = os.path.join(get_task_data_dir(), "chat")
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-len(".jsonl.gz")] for f in os.listdir(folder) if f.endswith(".jsonl.gz"))


def resolve_chat_path(name_or_path):
    """A path as given when it exists or looks like a path; else a shared chat file by name."""
    if os.path.exists(name_or_path) or os.sep in name_or_path or name_or_path.endswith((".jsonl", ".gz")):
        return data_path(path=name_or_path, what="chat conversations file")
    return data_path("chat", f"{name_or_path}.jsonl.gz", what=f"shared chat file {name_or_path!r}")


class ChatTask(Task):
    eval_type = "generative"

    def __init__(self, name_or_path, **kwargs):
        super().__init__(**kwargs)
        self.path = resolve_chat_path(name_or_path)
        self.rows = read_jsonl(self.path)
        for lineno, row in enumerate(self.rows, 1):
            try:
                validate_conversation(row)
            except ValueError as e:
                raise ValueError(f"{self.path}:{lineno}: {e}") from None

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return self.rows[index]
