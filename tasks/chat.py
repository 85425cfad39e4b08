"""
Conversations from JSONL files, one {"messages": [...]} per line (optionally gzipped): the shared chat data
(<data dir>/chat/*.jsonl.gz, picked by name) or any file of your own. Every row is validated on load and a
bad one is reported with its file and line. There is nothing to score: these are for training mixes.
"""
import os

from tasks.common import Task, data_path, read_jsonl, validate_conversation


class ChatTask(Task):
    def __init__(self, name_or_path, **kwargs):
        """name_or_path: a path, taken as given when it exists or looks like a path; else a shared chat file's name."""
        super().__init__(**kwargs)
        if os.path.exists(name_or_path) or os.sep in name_or_path or name_or_path.endswith((".jsonl", ".gz")):
            self.path = data_path(path=name_or_path, what="chat conversations file")
        else:
            self.path = data_path("chat", f"{name_or_path}.jsonl.gz", what=f"shared chat file {name_or_path!r}")
        self.rows = read_jsonl(self.path, validate_conversation)

    def get_example(self, index):
        return self.rows[index]
