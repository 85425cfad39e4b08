"""
Chat evaluation: how well a chat model answers the task library's questions.

Categorical tasks (ARC-Easy, ARC-Challenge, MMLU) are scored without sampling: each question is rendered
as a prompt that primes the assistant's reply, and the answer is the candidate letter whose token has the
highest logit at the answer position (the last prompt token, <|assistant_start|>). Prompts go through the
model in right-padded batches; attention is causal, so the padding never reaches the answer position.

Generative tasks (GSM8K, HumanEval) sample `num_samples` replies per problem through the inference engine
and score each; a problem counts as solved when any sample is correct (pass@k, k = num_samples).

ChatCORE is the mean over the evaluated tasks of the centered accuracy (acc - baseline) / (1 - baseline),
so chance is 0 and perfect is 1 (baseline 0.25 for the 4-way multiple choice tasks, 0 for generative ones).

The caller loads the tasks (tasks/registry.py's load_tasks, by name) and hands them in to run_chat_eval;
this module never imports tasks/. Under torchrun every rank takes problems rank::world_size and the counts
are summed across ranks.
"""
import itertools
import random
import time

import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import all_reduce_sum, dist_rank_world, print0
from nanochat.core_eval import centered_accuracy

TASK_NAMES = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval")
ORDER_SEED = 1234  # --max-problems takes a fixed shuffled sample, the same in every run

# -----------------------------------------------------------------------------
# Task names (tasks/registry.py loads the tasks by these names) and the metrics


def parse_task_names(spec):
    """'ARC-Easy|GSM8K' (or a list of names) -> ['ARC-Easy', 'GSM8K']. Case-insensitive, duplicates dropped;
    ValueError naming the unknown task otherwise. Here, not in tasks/, because scripts check their flags and
    this module canonicalizes the names it is given before any task data is loaded."""
    canonical = {name.lower(): name for name in TASK_NAMES}
    names = []
    for part in spec.split("|") if isinstance(spec, str) else spec:
        name = str(part).strip()
        if not name:
            raise ValueError(f"empty task name in {spec!r}; separate task names with '|'")
        if name.lower() not in canonical:
            raise ValueError(f"unknown task {name!r}; choose from {'|'.join(TASK_NAMES)}")
        names.append(canonical[name.lower()])
    return list(dict.fromkeys(names))  # duplicates dropped, first one kept


def pass_at_k(outcomes, k=None):
    """1 when any of the first k outcomes of one problem's samples (all of them when k is None) is correct,
    else 0: chat_eval scores a problem with k = its number of samples, chat_rl's pass@1..K curve with the
    first k of K samples. Stops at the first correct one, so a lazy iterable skips grading the rest.
    (The unbiased estimator 1 - C(n-c, k) / C(n, k) would change the figures chat_rl logs for k < n.)"""
    return int(any(bool(o) for o in itertools.islice(outcomes, k)))


def chat_core(results):
    """Mean centered accuracy over the evaluated tasks ({name: {"centered": x, ...}})."""
    if not results:
        raise ValueError("ChatCORE needs at least one evaluated task")
    return sum(r["centered"] for r in results.values()) / len(results)

# -----------------------------------------------------------------------------
# Problem order


def problem_order(num_problems, max_problems=None):
    """Indices to evaluate: all of them in order, or a fixed shuffled sample of max_problems."""
    order = list(range(num_problems))
    if max_problems is not None and max_problems < num_problems:
        random.Random(ORDER_SEED).shuffle(order)
        order = order[:max_problems]
    return order

# -----------------------------------------------------------------------------
# Categorical: the logits of the answer letters at the answer position


def letter_token_ids(tokenizer, letters):
    """Token id of each candidate letter; ValueError unless each letter encodes to exactly one token."""
    ids = []
    for letter in letters:
        tokens = tokenizer.encode(letter)
        if len(tokens) != 1:
            raise ValueError(f"answer letter {letter!r} encodes to {len(tokens)} tokens {tokens}; categorical "
                             "scoring needs every candidate letter to be a single token of the tokenizer")
        ids.append(tokens[0])
    return ids


@torch.no_grad()
def predict_letters(model, tokenizer, conversations, device=None, max_len=None):
    """One forward pass over the conversations' prompts (right-padded); per conversation, the letter of
    conversation["letters"] whose token has the highest logit at the answer position. Other tokens are
    ignored however likely. Prompts longer than max_len keep their last max_len tokens."""
    device = device if device is not None else next(model.parameters()).device
    prompts = [torch.tensor(tokenizer.render_for_completion(c)) for c in conversations]
    if max_len:
        prompts = [p[-max_len:] for p in prompts]
    ids = pad_sequence(prompts, batch_first=True, padding_value=tokenizer.get_bos_token_id())
    logits = model(ids.to(device))
    answer_pos = torch.tensor([len(p) - 1 for p in prompts], device=logits.device)
    last = logits[torch.arange(len(prompts), device=logits.device), answer_pos].float()  # (B, V)
    # argmax over the candidate letters' logits only; ties go to the earliest letter
    picks = [int(row[letter_token_ids(tokenizer, c["letters"])].argmax()) for c, row in zip(conversations, last)]
    return [c["letters"][j] for c, j in zip(conversations, picks)]


def evaluate_categorical(task, model, tokenizer, indices, batch_size=8, device=None):
    """Number of problems among `indices` answered correctly. Batches hold prompts of similar length
    (longest first, so running out of memory happens at once, not at the end)."""
    max_len = getattr(getattr(model, "config", None), "sequence_len", None)
    conversations = sorted((task[i] for i in indices), key=lambda c: -len(tokenizer.render_for_completion(c)))
    correct = 0
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        predictions = predict_letters(model, tokenizer, batch, device, max_len)
        correct += sum(bool(task.evaluate(c, p)) for c, p in zip(batch, predictions))
    return correct

# -----------------------------------------------------------------------------
# Generative: sample through the engine, pass@k


def sample_replies(engine, tokenizer, conversation, num_samples=1, max_new_tokens=512, temperature=0.0, top_k=50,
                   seed=42):
    """num_samples decoded replies to the conversation's last user turn (generated tokens only)."""
    prompt = tokenizer.render_for_completion(conversation)
    results, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                       temperature=temperature, top_k=top_k or None, seed=seed)
    if any(list(tokens[:len(prompt)]) != prompt for tokens in results):
        raise RuntimeError("engine result does not start with the prompt tokens")
    return [tokenizer.decode(list(tokens[len(prompt):])) for tokens in results]


def evaluate_generative(task, engine, tokenizer, indices, num_samples=1, max_new_tokens=512, temperature=0.0,
                        top_k=50, seed=42, label=""):
    """Number of problems among `indices` solved by at least one of num_samples replies. Problem i samples
    with seed + i, so results do not depend on how problems are split across ranks."""
    correct, t0 = 0, time.time()
    for n, i in enumerate(indices, 1):
        conversation = task[i]
        replies = sample_replies(engine, tokenizer, conversation, num_samples, max_new_tokens, temperature, top_k,
                                 seed + i)
        correct += pass_at_k(task.evaluate(conversation, r) for r in replies)
        if len(indices) >= 20 and n % (len(indices) // 10) == 0 and n < len(indices):  # rank 0's progress
            print0(f"  {label} {n}/{len(indices)} on rank 0: {correct} solved ({time.time() - t0:.0f}s)")
    return correct

# -----------------------------------------------------------------------------
# A whole evaluation


def evaluate_task(name, task, model, tokenizer, engine, max_problems, batch_size, device, **sampling):
    """{"accuracy", "centered", "correct", "num_problems", "metric", ...} for one task, summed over ranks.
    `sampling` holds evaluate_generative's settings."""
    order = problem_order(len(task), max_problems)
    rank, world_size = dist_rank_world()
    mine = order[rank::world_size]
    if task.eval_type == "categorical":
        correct = evaluate_categorical(task, model, tokenizer, mine, batch_size, device)
        metric = "accuracy"
    elif task.eval_type == "generative":
        correct = evaluate_generative(task, engine, tokenizer, mine, label=name, **sampling)
        metric = f"pass@{sampling['num_samples']}"
    else:
        raise ValueError(f"{name}: unknown eval_type {task.eval_type!r}")
    correct, total = all_reduce_sum(torch.tensor([correct, len(mine)], dtype=torch.long)).tolist()
    assert total == len(order), f"ranks evaluated {total} problems, expected {len(order)}"
    accuracy = correct / total if total else 0.0
    baseline = 0.25 if task.eval_type == "categorical" else 0.0  # 4-way multiple choice, or nothing by chance
    return {"accuracy": accuracy, "centered": centered_accuracy(accuracy, baseline), "correct": correct,
            "num_problems": total, "metric": metric, "eval_type": task.eval_type, "baseline": baseline}


def run_chat_eval(model, tokenizer, engine, task_names=None, max_problems=None, batch_size=8, num_samples=1,
                  max_new_tokens=512, temperature=0.0, top_k=50, seed=42, device=None, tasks=None):
    """Evaluate the model on the named tasks ('A|B' or a list; None = all of `tasks`). `tasks` ({name: Task},
    as tasks/registry.py's load_tasks builds it) holds the loaded tasks, so the caller loads them once and
    reuses them across evaluations during training; ValueError naming the fix when a named task is missing.
    `engine` is only needed for generative tasks; None builds nanochat.engine.Engine(model, tokenizer).
    Returns {"results": {name: {...}}, "chatcore": x, "metrics": {name: accuracy, ..., "ChatCORE": x},
    "settings": {...}}. Collective under torchrun: every rank must call it with the same arguments."""
    tasks = dict(tasks or {})
    names = parse_task_names(list(tasks) if task_names is None else task_names)
    if absent := [name for name in names if name not in tasks]:
        raise ValueError(f"task(s) {'|'.join(absent)} not loaded: pass tasks={{name: task}}, as built by "
                         f"tasks.registry.load_tasks({'|'.join(names)!r})")
    if engine is None and any(tasks[n].eval_type == "generative" for n in names):
        from nanochat.engine import Engine
        engine = Engine(model, tokenizer)
    sampling = {"num_samples": num_samples, "max_new_tokens": max_new_tokens, "temperature": temperature,
                "top_k": top_k, "seed": seed}
    was_training = model.training
    model.eval()
    results = {}
    try:
        for name in names:
            t0 = time.time()
            r = results[name] = evaluate_task(name, tasks[name], model, tokenizer, engine, max_problems, batch_size,
                                              device, **sampling)
            print0(f"{name:<14} {r['metric']:<9} {r['correct']:>5}/{r['num_problems']:<5} acc={r['accuracy']:.4f} "
                   f"centered={r['centered']:+.4f} ({time.time() - t0:.1f}s)")
    finally:
        model.train(was_training)
    core = chat_core(results)
    metrics = {name: r["accuracy"] for name, r in results.items()} | {"ChatCORE": core}
    settings = {"max_problems": max_problems, "batch_size": batch_size, **sampling}
    return {"results": results, "chatcore": core, "metrics": metrics, "settings": settings}

# -----------------------------------------------------------------------------
# Output: stdout table and report section


def format_results_table(out):
    lines = [f"{'Task':<14} {'Metric':<9} {'Problems':>8} {'Accuracy':>9} {'Centered':>9}"]
    for name, r in out["results"].items():
        lines.append(f"{name:<14} {r['metric']:<9} {r['num_problems']:>8} {r['accuracy']:>9.4f} {r['centered']:>9.4f}")
    lines.append(f"{'ChatCORE':<14} {'':<9} {'':>8} {'':>9} {out['chatcore']:>9.4f}")
    return "\n".join(lines)


def report_markdown(out, info=None):
    s = out["settings"]
    lines = [f"- {k}: {v}" for k, v in (info or {}).items()]
    lines.append(f"- max problems per task: {s['max_problems'] or 'all'}")
    if any(r["eval_type"] == "generative" for r in out["results"].values()):
        lines.append(f"- sampling: {s['num_samples']} sample(s), temperature {s['temperature']}, top-k "
                     f"{s['top_k'] or 'off'}, up to {s['max_new_tokens']} new tokens")
    lines.append(f"- ChatCORE: {out['chatcore']:.4f} (mean centered accuracy over {len(out['results'])} tasks)")
    lines += ["", "| Task | Metric | Problems | Accuracy | Centered |", "|---|---|---|---|---|"]
    for name, r in out["results"].items():
        lines.append(f"| {name} | {r['metric']} | {r['num_problems']} | {r['accuracy']:.4f} | {r['centered']:.4f} |")
    return "\n".join(lines)


def write_report(out, source, info=None):
    """The report section "Chat evaluation <source>" with metrics {task: accuracy, "ChatCORE": x} for the
    summary table; returns its path."""
    from nanochat.report import write_section
    return write_section(f"Chat evaluation {source}", report_markdown(out, info), metrics=out["metrics"])
