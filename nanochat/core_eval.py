"""
The DCLM CORE metric for base models.

A bundle of in-context-learning tasks (read by nanochat/core_bundle.py) is scored with a plain
next-token model:
- multiple_choice: one sequence per choice, the choice with the lowest mean loss over its tokens wins
- schema: one sequence per context option with a fixed continuation, lowest mean loss wins
- language_modeling: correct only if every continuation token is the argmax prediction
Each task's accuracy is centered on its random baseline, and CORE is the mean centered accuracy.
Printing and saving the results is scripts/base_eval.py's job.
"""
import os
import random
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import all_reduce_sum, dist_rank_world, print0
from nanochat.core_bundle import load_bundle, load_task_items

FEWSHOT_SEED = 1234  # few-shot examples for item i are drawn with random.Random(FEWSHOT_SEED + i)
ORDER_SEED = 1337    # items are evaluated in this shuffled order, so --max-per-task takes a fair sample

# -----------------------------------------------------------------------------
# Prompts

def sample_fewshot(num_items, idx, k):
    """k distinct item indices other than idx, the same on every run and every rank."""
    k = min(k, num_items - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(num_items - 1), k)
    return [j + (j >= idx) for j in picks]  # skip over idx itself


def _example_text(task, item):
    """A solved example as it appears among the few-shot examples."""
    d = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        return item["query"] + d + item["choices"][item["gold"]]
    if task.task_type == "schema":
        return item["context_options"][item["gold"]] + d + item["continuation"]
    return item["context"] + d + item["continuation"]


def render_item(task, items, idx):
    """The prompts of item idx as (context, continuation) pairs, one per sequence to score."""
    item, d = items[idx], task.continuation_delimiter
    shots = [_example_text(task, items[j]) for j in sample_fewshot(len(items), idx, task.num_fewshot)]
    prefix = "".join(s + "\n\n" for s in shots)
    if task.task_type == "multiple_choice":
        return [(prefix + item["query"] + d, choice) for choice in item["choices"]]
    if task.task_type == "schema":
        return [(prefix + option + d, item["continuation"]) for option in item["context_options"]]
    return [(prefix + item["context"] + d, item["continuation"])]


def tokenize_item(tokenizer, pairs):
    """Token ids (BOS first) of each context+continuation, and the [start, end) span of the
    continuation. The span starts where the tokens of the full prompt stop matching the tokens
    of the context alone, so a tokenizer that merges the delimiter into the continuation
    (" " + "Paris" -> " Paris") still gets exactly the continuation's tokens."""
    bos = tokenizer.get_bos_token_id()
    contexts = tokenizer.encode([c for c, _ in pairs], prepend=bos)
    fulls = tokenizer.encode([c + k for c, k in pairs], prepend=bos)
    spans = []
    for (c, k), ctx, full in zip(pairs, contexts, fulls):
        start = len(os.path.commonprefix([ctx, full]))
        if start >= len(full):
            raise ValueError(f"the continuation {k!r} has no tokens of its own after the context {c[-80:]!r}")
        spans.append((start, len(full)))
    return fulls, spans


def crop_left(seqs, spans, max_len):
    """Keep the last max_len tokens of each sequence, shifting its span to match. A continuation
    that does not fit is scored from the second kept token on (the first has no prediction)."""
    cuts = [max(0, len(seq) - max_len) for seq in seqs]
    return ([seq[cut:] for seq, cut in zip(seqs, cuts)],
            [(max(start - cut, 1), end - cut) for (start, end), cut in zip(spans, cuts)])

# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def score_sequences(model, seqs, spans, pad_id, device):
    """One forward pass over the sequences, right-padded with pad_id (causal attention, so the
    padding never affects the real positions). Returns, per sequence, the mean cross-entropy over
    its continuation tokens and whether every continuation token was the argmax prediction."""
    ids = pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=pad_id).to(device)
    logits = model(ids)
    losses, exact = [], []
    for i, (start, end) in enumerate(spans):
        pred = logits[i, start - 1 : end - 1].float()  # the logits at t predict the token at t+1
        target = ids[i, start:end]
        losses.append(F.cross_entropy(pred, target))
        exact.append((pred.argmax(dim=-1) == target).all())
    return torch.stack(losses).tolist(), torch.stack(exact).tolist()  # one device sync, not one per row


def evaluate_item(model, tokenizer, task, items, idx, device):
    """True when the model gets item idx right."""
    seqs, spans = tokenize_item(tokenizer, render_item(task, items, idx))
    seqs, spans = crop_left(seqs, spans, model.config.sequence_len)
    losses, exact = score_sequences(model, seqs, spans, tokenizer.get_bos_token_id(), device)
    if task.task_type == "language_modeling":
        return exact[0]
    return min(range(len(losses)), key=losses.__getitem__) == items[idx]["gold"]


def evaluate_task(model, tokenizer, task, items, device, max_items=-1):
    """(accuracy, number of items evaluated). Under torch.distributed each rank takes every
    world_size-th item and the counts are summed across ranks."""
    order = list(range(len(items)))
    random.Random(ORDER_SEED).shuffle(order)
    if max_items > 0:
        order = order[:max_items]
    rank, world_size = dist_rank_world()
    correct = sum(evaluate_item(model, tokenizer, task, items, idx, device) for idx in order[rank::world_size])
    correct = int(all_reduce_sum(torch.tensor([correct], dtype=torch.long)).item())
    return correct / len(order), len(order)


def centered_accuracy(accuracy, baseline):
    """(accuracy - baseline) / (1 - baseline): chance scores 0 and perfect scores 1. Both are fractions in
    [0, 1] (eval_meta_data.csv gives baselines in percent: divide by 100 first). ValueError for a baseline
    outside [0, 1), which is most likely a percentage passed by mistake. The one centering of CORE (per
    task) and ChatCORE (nanochat.chat_eval)."""
    if not 0 <= baseline < 1:
        raise ValueError(f"baseline {baseline!r} is not a fraction in [0, 1); a baseline in percent "
                         "(as in eval_meta_data.csv) must be divided by 100")
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core(model, tokenizer, eval_dir, max_per_task=-1, device=None):
    """Evaluate every task of the bundle whose data is present. Returns
    {"core": mean centered accuracy, "results": {label: {...}}, "missing": [labels], ...}."""
    tasks, missing = load_bundle(eval_dir)
    if not tasks:
        raise FileNotFoundError(f"none of the CORE task files listed in {eval_dir}/core.yaml exist under {eval_dir}/eval_data")
    device = device if device is not None else model.get_device()
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            t0 = time.time()
            items = load_task_items(eval_dir, task)
            acc, n = evaluate_task(model, tokenizer, task, items, device, max_per_task)
            centered = centered_accuracy(acc, task.random_baseline / 100.0)  # the CSV's percent as a fraction
            results[task.label] = {"accuracy": acc, "centered": centered, "num_items": n,
                                   "random_baseline": task.random_baseline, "task_type": task.task_type,
                                   "num_fewshot": task.num_fewshot}
            print0(f"CORE {task.label:<34} {task.task_type:<18} shots={task.num_fewshot:<2} n={n:<6} "
                   f"acc={acc:.4f} centered={centered:+.4f} ({time.time() - t0:.1f}s)")
    finally:
        model.train(was_training)
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"core": core, "results": results, "missing": missing, "max_per_task": max_per_task,
            "eval_dir": os.path.abspath(eval_dir)}
