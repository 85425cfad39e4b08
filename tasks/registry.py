"""
The chat evaluation tasks by name: what `--task-name` / `--eval-tasks` flags turn into task objects.

    tasks = load_tasks("ARC-Easy|GSM8K")   # {"ARC-Easy": ARC(...), "GSM8K": GSM8K(...)}
    run_chat_eval(model, tokenizer, engine, list(tasks), tasks=tasks)

The names and their parsing are nanochat.chat_eval's (the library canonicalizes names without loading any
data); this module adds the one step the library may not take, importing tasks/ (which finds the data).
"""
from nanochat.chat_eval import TASK_NAMES, parse_task_names

__all__ = ["TASK_NAMES", "parse_task_names", "load_task", "load_tasks"]


def load_task(name):
    """The evaluation split of one task by its canonical name (see TASK_NAMES). ValueError naming the
    choices for an unknown name; FileNotFoundError from the task when its data is missing."""
    if name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC
        return ARC(subset=name, split="test")
    if name == "MMLU":
        from tasks.mmlu import MMLU
        return MMLU(split="test")
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K(split="test")
    if name == "HumanEval":
        from tasks.humaneval import HumanEval
        return HumanEval()
    raise ValueError(f"unknown task {name!r}; choose from {'|'.join(TASK_NAMES)}")


def load_tasks(spec):
    """'ARC-Easy|MMLU' (or a list of names) -> {canonical name: task}, in the given order; 'none' or ''
    (any case, surrounding spaces ignored) -> {}, so a flag can switch the evaluation off.
    ValueError for an unknown or empty name, FileNotFoundError when a task's data is missing."""
    if not spec or (isinstance(spec, str) and spec.strip().lower() in ("", "none")):
        return {}
    return {name: load_task(name) for name in parse_task_names(spec)}
