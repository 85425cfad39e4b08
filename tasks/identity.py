"""
Short conversations that teach the model who it is: its name (nanochat), that it comes from an open-source
project, and what it can and cannot do. The default file, tasks/identity_conversations.jsonl, is meant to be
edited: change the name or the facts there (or pass your own file as name_or_path=) and retrain.
"""
import functools
import os

from tasks.chat import ChatTask

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "identity_conversations.jsonl")
IdentityTask = functools.partial(ChatTask, name_or_path=DEFAULT_PATH)
