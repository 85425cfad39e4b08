"""
The DCLM CORE metric for base models.

A bundle of in-context-learning tasks (read by nanochat/core_bundle.py) is scored with a plain
next-token model:
- multiple_choice: one sequence per choice, the choice with the lowest mean loss over its tokens wins
- schema: one sequence per context option with a fixed continuation, lowest mean loss wins
- language_modeling: correct only if every continuation token is the argmax prediction
The scored tokens follow the reference harness's span rule (see "Prompts" below), long prompts are cropped
from the left (crop_left), and the logits are computed in fp32 whatever the compute dtype (fp32_head).
Each task's accuracy is centered on its random baseline, and CORE is the mean centered accuracy.
Printing and saving the results is scripts/base_eval.py's job.
"""
import contextlib
import os
import random
import time

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import all_reduce_sum, dist_rank_world, print0
from nanochat.core_bundle import load_bundle, load_task_items
from nanochat.gpt import GPT

FEWSHOT_SEED = 1234  # few-shot examples for item i are drawn with random.Random(FEWSHOT_SEED + i)
ORDER_SEED = 1337    # items are evaluated in this shuffled order, so --max-per-task takes a fair sample

# -----------------------------------------------------------------------------
# Prompts
#
# The span rule, the one of DCLM's reference harness (llm-foundry's in-context-learning evaluator): every
# string field of a row is stripped of surrounding whitespace, the rendered context (few-shot examples + this
# item + the delimiter) loses its trailing whitespace, and that whitespace goes onto the front of the
# continuation, which is tokenized on its own and appended. So the scored tokens are exactly the tokens of
# " " + answer for every CORE delimiter (" " and "\nAnswer: "), whether or not the tokenizer merges the space
# into the answer's first token: a digit, a bracket or a rare word is scored with its space token, like a word
# that merges. The rule depends only on the text, so every choice of a question and every context option of a
# schema item gets the same one. (The reference puts exactly one space before the answer whatever the
# delimiter ends in; moving the delimiter's own whitespace is the same for every CORE task and keeps the text.)

def sample_fewshot(num_items, idx, k):
    """k distinct item indices other than idx, the same on every run and every rank."""
    k = min(k, num_items - 1)
    if k <= 0:
        return []
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(num_items - 1), k)
    return [j + (j >= idx) for j in picks]  # skip over idx itself


def strip_fields(item):
    """The row with every string, and every string in a list, stripped of surrounding whitespace (the
    reference harness strips its rows on loading). Then the whitespace between a context and its
    continuation is exactly the delimiter's, and no row adds its own (piqa's queries end in "\n",
    bigbench_language_identification's in "Answer: ", a few jeopardy answers in " ")."""
    def strip(v):
        return v.strip() if isinstance(v, str) else v
    return {k: [strip(x) for x in v] if isinstance(v, list) else strip(v) for k, v in item.items()}


def _example_text(task, item):
    """A solved example as it appears among the few-shot examples."""
    d = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        return item["query"] + d + item["choices"][item["gold"]]
    if task.task_type == "schema":
        return item["context_options"][item["gold"]] + d + item["continuation"]
    return item["context"] + d + item["continuation"]


def split_at_whitespace(context, continuation):
    """(context without its trailing whitespace, that whitespace + continuation): the same text, split
    where the reference harness splits it (str.rstrip: any Unicode whitespace)."""
    kept = context.rstrip()
    return kept, context[len(kept):] + continuation


def render_item(task, items, idx):
    """The prompts of item idx as (context, continuation) pairs, one per sequence to score; context +
    continuation is the prompt's text: the few-shot examples (each followed by a blank line), the item, the
    delimiter and the answer, with the span rule above (the delimiter's trailing whitespace starts the
    continuation). multiple_choice: one pair per choice, each choice scored whole (words that all choices
    share are scored too); schema: one pair per context option, only the shared continuation scored;
    language_modeling: one pair."""
    item, d = strip_fields(items[idx]), task.continuation_delimiter
    shots = [_example_text(task, strip_fields(items[j])) for j in sample_fewshot(len(items), idx, task.num_fewshot)]
    prefix = "".join(s + "\n\n" for s in shots)
    if task.task_type == "multiple_choice":
        pairs = [(prefix + item["query"] + d, choice) for choice in item["choices"]]
    elif task.task_type == "schema":
        pairs = [(prefix + option + d, item["continuation"]) for option in item["context_options"]]
    else:
        pairs = [(prefix + item["context"] + d, item["continuation"])]
    return [split_at_whitespace(c, k) for c, k in pairs]


def tokenize_item(tokenizer, pairs):
    """Token ids (BOS first) of each context+continuation, and the [start, end) span of the continuation.

    The context and the continuation are encoded separately and concatenated, as the reference harness does:
    the span is then the continuation's own tokens by construction, the same rule for every pair whatever the
    tokenizer does at the boundary. (Encoding the joint text and taking the span where it stops matching the
    context's tokens is what went wrong before: a space that the tokenizer kept apart from the answer stayed
    in the context.) With a GPT-style pre-split (nanochat's, GPT-2's, GPT-4's) the two encodings agree when
    the continuation starts with a space, as it does for every CORE delimiter: no pre-split chunk runs from a
    non-space into a following space, so the model is fed the tokens of the plain text (on the whole CORE
    bundle, no item differs: docs/core_eval.md)."""
    bos = tokenizer.get_bos_token_id()
    unique = list(dict.fromkeys(c for c, _ in pairs))  # the choices of a question share one context
    encoded = dict(zip(unique, tokenizer.encode(unique, prepend=bos)))
    seqs, spans = [], []
    for (c, k), cont in zip(pairs, tokenizer.encode([k for _, k in pairs])):
        if not cont:
            raise ValueError(f"the continuation {k!r} has no tokens after the context {c[-80:]!r}")
        ctx = encoded[c]
        seqs.append(ctx + cont)
        spans.append((len(ctx), len(ctx) + len(cont)))
    return seqs, spans


def crop_left(seqs, spans, max_len):
    """The window fed to a model of context max_len: the last max_len tokens of each sequence (the
    continuation is at the end, so its span stays inside the window; the context, BOS first, loses its
    start), with the span shifted to match. The reference harness crops the same way. Only a continuation of
    max_len tokens or more does not fit: it is scored from the window's second token on (the first has no
    prediction), its first tokens left out, where the reference harness gives up on the whole dataset."""
    cuts = [max(0, len(seq) - max_len) for seq in seqs]
    return ([seq[cut:] for seq, cut in zip(seqs, cuts)],
            [(max(start - cut, 1), end - cut) for (start, end), cut in zip(spans, cuts)])

# -----------------------------------------------------------------------------
# Scoring

@contextlib.contextmanager
def fp32_head(model):
    """Inside, a nanochat GPT computes its output head (the last matmul, the logits) in full fp32: outside
    autocast, from the fp32 hidden state and weight, with fp32 matmuls at "highest" precision (no TF32).
    The blocks keep the compute dtype. A bf16 head rounds its inputs to 8 significant bits, which moves
    the logits enough to flip near-tied choices and argmaxes; in fp32 they do not depend on it. Other
    models (the tests' stand-ins) are left as they are. GPT.forward itself is not changed: the override is
    an instance attribute over GPT._head, removed on exit."""
    if not isinstance(model, GPT):
        yield
        return

    def head(x):
        w = model.transformer.wte.weight if model.lm_head is None else model.lm_head.weight
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), w.float())

    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    model._head = head
    try:
        yield
    finally:
        del model._head
        torch.set_float32_matmul_precision(precision)


@torch.no_grad()
def score_sequences(model, seqs, spans, pad_id, device):
    """One forward pass over the sequences, right-padded with pad_id (causal attention, so the
    padding never affects the real positions), with fp32 logits (fp32_head). Returns, per sequence, the
    mean cross-entropy over its continuation tokens and whether every continuation token was the argmax
    prediction."""
    ids = pad_sequence([torch.tensor(s) for s in seqs], batch_first=True, padding_value=pad_id).to(device)
    with fp32_head(model):
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
