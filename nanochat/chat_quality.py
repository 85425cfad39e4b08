"""
Conversation quality, offline: how well a model holds an English conversation, measured without an external
judge, deterministically for a given seed, comparably across stages (base, mid, SFT) and tokenizers.

- Assistant bits per byte: on held-out conversations rendered in the chat format, the summed cross-entropy
  (nats) of the assistant's tokens (the render mask: its text, its tool calls and each <|assistant_end|>) /
  ln 2 / the UTF-8 bytes of those tokens. Special tokens have 0 bytes but their nats count: ending the turn
  is part of the reply (unlike nanochat.loss_eval's text bpb, which skips them). Bytes do not depend on the
  tokenizer, so neither does the figure (tests/test_chat_quality.py checks it exactly). A conversation longer
  than the context is scored in consecutive windows of sequence_len targets, each target exactly once.
- Context use: the bpb of each multi-turn conversation's final assistant turn given the whole conversation
  versus given only its last user turn (a leading system message kept in both: it is an instruction, not an
  earlier turn); each prompt keeps its last sequence_len + 1 tokens. The gain (last-turn-only minus whole) is
  what the earlier turns are worth to the model.
- Replies: for held-out conversations, the reply to the last user turn generated at the serving defaults
  (nanochat.serve.ServeConfig, prompt i seeded seed + i) and greedily; text statistics below (METRICS).

Under torchrun every rank takes items rank::world_size; sums are all-reduced and replies gathered, so the
figures do not depend on the number of ranks. This module does not use the tasks/ package: the caller hands in
the conversations (scripts/chat_quality.py picks the held-out split of a mixture or a file).
"""
import math
import os
import re
import time

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from nanochat.common import all_reduce_sum, dist_rank_world, is_ddp_initialized, print0, read_jsonl
from nanochat.conversation import content_text, validate_conversation
from nanochat.serve import ServeConfig

SERVING = ServeConfig()  # the web server's generation defaults: temperature 0.8, top-k 50

# name: (definition, direction). Reply metrics are reported per setting (serving "reply_*", greedy "greedy_*").
METRICS = {
    "assistant_bpb": ("assistant-token nats / ln 2 / their UTF-8 bytes on held-out conversations", "lower"),
    "context_bpb_full": ("bpb of final assistant turns given the whole conversation", "lower"),
    "context_bpb_last_turn": ("bpb of the same turns given only the last user turn (+ system message)", "lower"),
    "context_gain": ("context_bpb_last_turn - context_bpb_full: what earlier turns are worth", "higher"),
    "words": ("mean reply length in words (p10/p50/p90 too); compare with the held-out replies", "closer to reference"),
    "ended": ("share of replies that end with <|assistant_end|> before the token limit", "higher"),
    "repeat4": ("mean over replies of the share of word 4-grams that repeat an earlier 4-gram of the reply", "lower"),
    "distinct1": ("distinct words / all words, over all replies together", "higher"),
    "distinct2": ("distinct word bigrams / all word bigrams, over all replies together", "higher"),
    "leak": ("share of replies in tool-free conversations that emit a special token other than the final "
             "<|assistant_end|> (turn markers, tool calls, <|bos|>)", "lower"),
    "english": ("share of replies that are English: >= 90% of letters ASCII and, with 4+ words, >= 10% of words "
                "from a list of common English function words", "higher"),
}

# -----------------------------------------------------------------------------
# Held-out conversations and text statistics

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # letters/digits, inner apostrophes kept ("don't"); lowercased below
STOPWORDS = frozenset(
    "the a an and or but if of to in on at by for with from as is are was were be been am it its this that these "
    "those i you he she we they me my your our their his her him them not no yes do does did have has had can "
    "will would should could what which who how when where there here so just i'm you're it's that's don't "
    "let's i'll we're".split())


def words(text):
    return WORD.findall(text.lower())


def ngrams(ws, n):
    return list(zip(*(ws[i:] for i in range(n))))


def repeated_share(ws, n=4):
    """Share of the reply's n-grams that repeat an earlier one (0 = none, -> 1 for a loop); None under n words."""
    grams = ngrams(ws, n)
    return 1 - len(set(grams)) / len(grams) if grams else None


def distinct_n(word_lists, n):
    """Distinct n-grams / all n-grams over all replies together (0 when there are none)."""
    grams = [g for ws in word_lists for g in ngrams(ws, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def is_english(text):
    """The METRICS["english"] heuristic: mostly ASCII letters and, for 4+ words, some common function words."""
    letters = [c for c in text if c.isalpha()]
    if not letters or sum(c.isascii() for c in letters) < 0.9 * len(letters):
        return False
    ws = words(text)
    return len(ws) < 4 or sum(w in STOPWORDS for w in ws) >= 0.1 * len(ws)


def load_conversations(path):
    """(conversations, sources) of a {"messages": [...]} JSONL(.gz) file, each row checked by the one validator
    (ValueError naming file and line); a row's "source" string names its source, else the file's name."""
    rows = read_jsonl(path, lambda row: validate_conversation(row) is not None, 'a {"messages": [...]} conversation')
    if not rows:
        raise ValueError(f"{path}: no conversations in it")
    stem = os.path.basename(path).split(".")[0]
    return rows, [r["source"] if isinstance(r.get("source"), str) and r["source"] else stem for r in rows]


def user_key(conversation):
    """The user turns, whitespace-collapsed and lowercased: what a reply is prompted with."""
    texts = [m["content"] for m in conversation["messages"] if m["role"] != "assistant"]
    return re.sub(r"\s+", " ", "\n".join(t if isinstance(t, str) else "" for t in texts)).strip().lower()


def decontaminate(heldout, training):
    """Indices of the held-out conversations whose user turns (user_key) match no training conversation's."""
    seen = {user_key(c) for c in training}
    return [i for i, c in enumerate(heldout) if user_key(c) not in seen]

# -----------------------------------------------------------------------------
# Bits per byte of assistant tokens


def windows(ids, mask, T):
    """Consecutive windows of at most T + 1 tokens overlapping by one, so every target position 1..n-1 is in
    exactly one window (as a target) and sees the window's earlier tokens (up to T) as context."""
    return [(ids[s:s + T + 1], mask[s:s + T + 1]) for s in range(0, max(1, len(ids) - 1), T)]


def final_turn_rows(tokenizer, conversation, T):
    """(whole, last_turn_only) renders of the conversation's final assistant turn, the mask on that turn only,
    each keeping its last T + 1 tokens; None unless the turn follows at least two user turns."""
    messages = list(validate_conversation(conversation, strict=False))
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if sum(m["role"] == "user" for m in messages) < 2:
        return None
    system = messages[:1] if messages[0]["role"] == "system" else []
    start = tokenizer.encode_special("<|assistant_start|>")
    rows = []
    for msgs in (messages, system + messages[-2:]):
        ids, mask = tokenizer.render_conversation(msgs, max_tokens=1 << 30)
        last = len(ids) - 1 - ids[::-1].index(start)  # the final turn's <|assistant_start|>
        mask = [m if i > last else 0 for i, m in enumerate(mask)]
        rows.append((ids[-(T + 1):], mask[-(T + 1):]))
    return rows


@torch.no_grad()
def score_rows(model, rows, token_bytes, batch_size=8):
    """float64 tensor (len(rows), 3): summed nats, UTF-8 bytes and tokens of each row's masked targets (the
    target ids[j] counts when mask[j] is 1). Rows are batched by length, right-padded."""
    device = model.get_device()
    out = torch.zeros(len(rows), 3, dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
    for b in range(0, len(order), batch_size):
        batch = [rows[r] for r in order[b:b + batch_size]]
        x = pad_sequence([torch.tensor(ids[:-1]) for ids, _ in batch], batch_first=True).to(device)
        y = pad_sequence([torch.tensor(ids[1:]).where(torch.tensor(mask[1:], dtype=torch.bool), -1)
                          for ids, mask in batch], batch_first=True, padding_value=-1).to(device)
        nats = model(x, y, loss_reduction="none").double()  # 0 where y == -1
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], 0)
        sums = torch.stack([nats.sum(1), nbytes.sum(1).double(), valid.sum(1).double()], 1).cpu()
        out[order[b:b + batch_size]] = sums
    return out


def bits_per_byte(nats, nbytes):
    return float(nats) / (math.log(2) * float(nbytes)) if nbytes else float("nan")


def assistant_bpb(model, tokenizer, conversations, sources=None, batch_size=8):
    """{"bpb", "conversations", "bytes", "tokens", "by_source": {name: {...same}}} over the conversations'
    assistant tokens (module docstring). A collective under torchrun: every rank passes the same lists."""
    sources = list(sources) if sources is not None else ["all"] * len(conversations)
    names = sorted(set(sources))
    rank, world = dist_rank_world()
    T = model.config.sequence_len
    rows, owners, counts = [], [], torch.zeros(len(names), 1, dtype=torch.float64)
    for i in range(rank, len(conversations), world):
        ids, mask = tokenizer.render_conversation(conversations[i], max_tokens=1 << 30)
        s = names.index(sources[i])
        parts = [w for w in windows(ids, mask, T) if any(w[1][1:])]  # windows with assistant targets
        rows += parts
        owners += [s] * len(parts)
        counts[s] += 1
    scored = score_rows(model, rows, tokenizer.token_bytes().to(model.get_device()), batch_size)
    sums = torch.zeros(len(names), 3, dtype=torch.float64).index_add_(0, torch.tensor(owners, dtype=torch.long), scored)
    sums = all_reduce_sum(torch.cat([sums, counts], 1).to(model.get_device())).cpu()  # nats, bytes, tokens, convs

    def entry(row):
        return {"bpb": bits_per_byte(row[0], row[1]), "conversations": int(row[3]), "bytes": int(row[1]),
                "tokens": int(row[2])}
    total = entry(sums.sum(0))
    if total["bytes"] == 0:
        raise ValueError("the held-out conversations have no assistant text to score")
    return total | {"by_source": {n: entry(sums[s]) for s, n in enumerate(names)}}


def context_use(model, tokenizer, conversations, batch_size=8):
    """{"conversations", "bpb_full", "bpb_last_turn", "gain", "bytes"} over the multi-turn conversations'
    final assistant turns; {"conversations": 0} when there are none. Collective under torchrun."""
    rank, world = dist_rank_world()
    T = model.config.sequence_len
    rows = []  # (whole, last turn only) of each of this rank's multi-turn conversations
    for i in range(rank, len(conversations), world):
        rows += final_turn_rows(tokenizer, conversations[i], T) or []
    scored = score_rows(model, rows, tokenizer.token_bytes().to(model.get_device()), batch_size)
    whole, last_only = scored[0::2], scored[1::2]
    sums = torch.tensor([whole[:, 0].sum(), last_only[:, 0].sum(), whole[:, 1].sum(), len(whole)], dtype=torch.float64)
    nats_full, nats_last, nbytes, count = all_reduce_sum(sums.to(model.get_device())).tolist()
    if count == 0 or nbytes == 0:
        return {"conversations": int(count)}
    full, last = bits_per_byte(nats_full, nbytes), bits_per_byte(nats_last, nbytes)
    return {"conversations": int(count), "bpb_full": full, "bpb_last_turn": last, "gain": last - full,
            "bytes": int(nbytes)}

# -----------------------------------------------------------------------------
# Replies


def generate_reply(engine, tokenizer, prompt, max_new_tokens, temperature, top_k, seed):
    """{"text", "ended", "leaked", "tokens"}: one reply through the engine. ended: it stopped at
    <|assistant_end|> within max_new_tokens; leaked: the model sampled another special token (a <|bos|> stop
    included). The text leaves special tokens out."""
    specials = set(tokenizer.special_tokens.values())
    end = tokenizer.encode_special("<|assistant_end|>")
    tokens, leaked, ended = [], False, False
    for column, masks in engine.generate(prompt, 1, max_new_tokens, temperature, top_k or None, seed=seed):
        token, sampled = column[0], masks[0] == 1
        if sampled and token in specials and token != end:
            leaked = True
        if token in engine.stop_tokens:
            ended = token == end
            break
        tokens.append(token)
    text = tokenizer.decode([t for t in tokens if t not in specials])
    return {"text": text, "ended": ended, "leaked": leaked, "tokens": len(tokens)}


def _gather(items):
    """Every rank's list of (index, item) pairs, joined and sorted by index."""
    if is_ddp_initialized():
        import torch.distributed as dist
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        items = [pair for part in parts for pair in part]
    return sorted(items, key=lambda pair: pair[0])


def reply_stats(replies, plain=None):
    """The METRICS reply statistics of a list of {"text", optional "ended", "leaked"}; `plain[i]` says whether
    reply i's conversation is tool-free (leak share over those; all when None). ended/leak are None for texts
    without them (the held-out reference replies)."""
    if not replies:
        return {"replies": 0}
    word_lists = [words(r["text"]) for r in replies]
    lengths = np.array([len(ws) for ws in word_lists], dtype=np.float64)
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90]).tolist()
    repeats = [x for x in (repeated_share(ws) for ws in word_lists) if x is not None]
    stats = {"replies": len(replies), "words": float(lengths.mean()), "words_p10": p10, "words_p50": p50,
             "words_p90": p90, "ended": None, "repeat4": float(np.mean(repeats)) if repeats else 0.0,
             "distinct1": distinct_n(word_lists, 1), "distinct2": distinct_n(word_lists, 2), "leak": None,
             "english": float(np.mean([is_english(r["text"]) for r in replies]))}
    if all("ended" in r for r in replies):
        stats["ended"] = float(np.mean([r["ended"] for r in replies]))
        plain = plain if plain is not None else [True] * len(replies)
        in_plain = [r["leaked"] for r, p in zip(replies, plain) if p]
        stats["leak"] = float(np.mean(in_plain)) if in_plain else None
    return stats


def evaluate_replies(engine, tokenizer, conversations, max_new_tokens=256, temperature=SERVING.temperature,
                     top_k=SERVING.top_k, seed=42):
    """{"serving": stats, "greedy": stats, "reference": stats, "samples": [...]}: a reply to each conversation's last
    user turn (its final assistant message, if any, is the reference) at the serving settings (seed + i) and greedily.
    Prompts keep their last max(T // 2, T - max_new_tokens) tokens. Collective under torchrun."""
    rank, world = dist_rank_world()
    T = engine.model.config.sequence_len
    keep = max(T // 2, T - max_new_tokens)
    mine, t0 = [], time.time()
    for n, i in enumerate(range(rank, len(conversations), world), 1):
        prompt = tokenizer.render_for_completion(conversations[i])[-keep:]
        serving = generate_reply(engine, tokenizer, prompt, max_new_tokens, temperature, top_k, seed + i)
        greedy = generate_reply(engine, tokenizer, prompt, max_new_tokens, 0.0, None, seed + i)
        mine.append((i, {"serving": serving, "greedy": greedy}))
        if n % 25 == 0:
            print0(f"  replies: {n} on rank 0 ({time.time() - t0:.0f}s)")
    done = [r for _, r in _gather(mine)]
    plain = [all(isinstance(m["content"], str) for m in validate_conversation(c, strict=False))  # no tool parts
             for c in conversations]
    refs = [{"text": content_text(c["messages"][-1]["content"])} for c in conversations
            if c["messages"][-1]["role"] == "assistant"]
    samples = [{"user": next(m["content"] for m in reversed(c["messages"]) if m["role"] == "user"),
                "serving": r["serving"]["text"], "greedy": r["greedy"]["text"]}
               for c, r in list(zip(conversations, done))[:3]]
    return {"serving": reply_stats([r["serving"] for r in done], plain),
            "greedy": reply_stats([r["greedy"] for r in done], plain),
            "reference": reply_stats(refs), "samples": samples}

# -----------------------------------------------------------------------------
# The whole evaluation, and its report


def run_chat_quality(model, tokenizer, engine, conversations, sources=None, max_replies=100, max_new_tokens=256,
                     temperature=SERVING.temperature, top_k=SERVING.top_k, seed=42, batch_size=8):
    """All of it: {"bpb", "context", "replies" (None when max_replies is 0), "metrics" (flat, for the report),
    "settings"}. `engine` (nanochat.engine.Engine) is only used for the replies. Collective under torchrun."""
    was_training = model.training
    model.eval()
    try:
        t0 = time.time()
        bpb = assistant_bpb(model, tokenizer, conversations, sources, batch_size)
        context = context_use(model, tokenizer, conversations, batch_size)
        print0(f"assistant bpb {bpb['bpb']:.4f} on {bpb['conversations']} conversations ({time.time() - t0:.1f}s)")
        replies = None
        if max_replies:
            t0 = time.time()
            replies = evaluate_replies(engine, tokenizer, conversations[:max_replies], max_new_tokens, temperature,
                                       top_k, seed)
            print0(f"replies to {replies['serving']['replies']} prompts, serving and greedy ({time.time() - t0:.1f}s)")
    finally:
        model.train(was_training)
    metrics = {"assistant_bpb": bpb["bpb"]}
    metrics |= {f"assistant_bpb/{name}": s["bpb"] for name, s in bpb["by_source"].items()}
    if context["conversations"]:
        metrics |= {"context_bpb_full": context["bpb_full"], "context_bpb_last_turn": context["bpb_last_turn"],
                    "context_gain": context["gain"]}
    for setting, prefix in (("serving", "reply"), ("greedy", "greedy")):
        stats = (replies or {}).get(setting, {})
        metrics |= {f"{prefix}_{k}": v for k, v in stats.items() if k != "replies" and v is not None}
    settings = {"conversations": len(conversations), "max_replies": max_replies, "max_new_tokens": max_new_tokens,
                "temperature": temperature, "top_k": top_k, "seed": seed, "sequence_len": model.config.sequence_len}
    return {"bpb": bpb, "context": context, "replies": replies, "metrics": metrics, "settings": settings}


def _cell(v, digits=4):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def _quote(text, limit=160):
    text = " ".join(text.split())
    return (text if len(text) <= limit else text[:limit] + "...").replace("|", "\\|") or "(empty)"


def report_markdown(out, info=None):
    """The report section's body: settings, bpb by source, context use, the reply table, three samples."""
    s, bpb, ctx = out["settings"], out["bpb"], out["context"]
    lines = [f"- {k}: {v}" for k, v in (info or {}).items()]
    lines += [f"- held-out conversations: {s['conversations']} (context {s['sequence_len']} tokens)",
              f"- assistant bpb: {bpb['bpb']:.4f} over {bpb['bytes']:,} bytes / {bpb['tokens']:,} tokens "
              "(lower is better; <|assistant_end|> nats count, its bytes are 0)"]
    if ctx["conversations"]:
        lines.append(f"- context use on {ctx['conversations']} multi-turn conversations: final turn "
                     f"{ctx['bpb_full']:.4f} bpb given the whole conversation, {ctx['bpb_last_turn']:.4f} given only "
                     f"the last user turn: gain {ctx['gain']:+.4f} (higher = earlier turns used more)")
    else:
        lines.append("- context use: no multi-turn conversations among the held-out ones")
    lines += ["", "| Source | Conversations | Bytes | Assistant bpb |", "|---|---|---|---|"]
    lines += [f"| {name} | {e['conversations']} | {e['bytes']:,} | {_cell(e['bpb'])} |"
              for name, e in bpb["by_source"].items()]
    replies = out["replies"]
    if replies:
        lines += ["", f"Replies to {replies['serving']['replies']} held-out user turns, up to {s['max_new_tokens']} "
                  f"new tokens: serving = temperature {s['temperature']}, top-k {s['top_k'] or 'off'}, seed "
                  f"{s['seed']} + i; greedy = argmax; reference = the held-out replies.", "",
                  "| Metric | Better | Serving | Greedy | Reference |", "|---|---|---|---|---|"]
        for key in ("words", "words_p10", "words_p50", "words_p90", "ended", "repeat4", "distinct1", "distinct2",
                    "leak", "english"):
            better = METRICS[key.split("_")[0]][1]
            cells = [_cell(replies[k].get(key), 1 if key.startswith("words") else 4)
                     for k in ("serving", "greedy", "reference")]
            lines.append(f"| {key} | {better} | " + " | ".join(cells) + " |")
        lines += ["", "| User | Serving reply | Greedy reply |", "|---|---|---|"]
        lines += [f"| {_quote(x['user'])} | {_quote(x['serving'])} | {_quote(x['greedy'])} |" for x in replies["samples"]]
    return "\n".join(lines)


def write_report(out, source, info=None):
    """The report section "Chat quality <source>" with out["metrics"] for the summary table; returns its path."""
    from nanochat.report import write_section
    return write_section(f"Chat quality {source}", report_markdown(out, info), metrics=out["metrics"])
