"""
Conversation quality of a model at any stage, offline (nanochat/chat_quality.py; docs/chat_quality.md): bits per
byte on the assistant turns of held-out conversations, overall and per source; how much the final turn gains
from the earlier ones; and replies generated at the serving defaults and greedily (length, whether they end,
repetition, diversity, special-token leaks, English share).

python -m scripts.chat_quality -i sft
python -m scripts.chat_quality -i base --max-replies=0                  # bpb only (works for base models too)
python -m scripts.chat_quality -i mid --data=my_heldout.jsonl --max-replies=50
torchrun --nproc_per_node=8 -m scripts.chat_quality -- -i sft

Held-out conversations: --data (a {"messages": [...]} JSONL(.gz); a row's "source" names its source), or by
default the fixed validation slices of --mixture's sources (tasks/mixtures.py: never trained on by either
chat stage), minus any whose user turns repeat a training conversation's. Prints a summary and writes the
report section "Chat quality <source>".
"""
from nanochat.chat_quality import (SERVING, decontaminate, load_conversations, report_markdown, run_chat_quality,
                                   write_report)
from nanochat.common import (autocast_context, compute_cleanup, compute_init, get_compute_dtype, make_parser,
                             non_negative_float, non_negative_int, positive_int, print0)
from nanochat.engine import Engine
from tasks.mixtures import MIXTURES, build_mixture

from ._cli import add_model_source_flags, device_type_or_exit, load_model_or_exit, stage_error


def get_parser():
    p = make_parser(__doc__)
    add_model_source_flags(p, source=None)
    g = p.add_argument_group("held-out conversations")
    g.add_argument("--data", default="", help="a {'messages': [...]} JSONL(.gz) file; default: --mixture's held-out slices")
    g.add_argument("--mixture", default="english-chat", choices=list(MIXTURES),
                   help="named mixture whose held-out slices are evaluated (without --data)")
    g.add_argument("--max-conversations", type=positive_int, default=1000,
                   help="held-out conversations scored for bpb (the first ones; mixture slices interleave sources)")
    g = p.add_argument_group("replies")
    g.add_argument("--max-replies", type=non_negative_int, default=100,
                   help="the first N of those conversations get replies to their last user turn (0 = none)")
    g.add_argument("--max-new-tokens", type=positive_int, default=256, help="reply length limit in tokens")
    g.add_argument("--temperature", type=non_negative_float, default=SERVING.temperature,
                   help="the sampled setting's temperature (the server's default; greedy is always run too)")
    g.add_argument("--top-k", type=non_negative_int, default=SERVING.top_k, help="the sampled setting's top-k; 0 = off")
    g.add_argument("--seed", type=int, default=42, help="sampling seed (prompt i uses seed + i)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward pass (bpb)")
    return p


def heldout_from_mixture(name):
    """(conversations, sources, note) of the named mixture's held-out slices, decontaminated against its training
    rows (the slices depend only on each source's rows: the same for midtraining and SFT)."""
    mixture = build_mixture(name, "sft")
    refs = mixture.val_rows()
    heldout = [mixture.get(r) for r in refs]
    training = [mixture.get((s, i)) for s, rows in enumerate(mixture.train) for i in rows]
    keep = decontaminate(heldout, training)
    note = (f"held-out slices of mixture {name} ({len(heldout)} conversations; {len(heldout) - len(keep)} dropped "
            "whose user turns repeat a training conversation's)")
    return [heldout[i] for i in keep], [mixture.names[refs[i][0]] for i in keep], note


def load_heldout(data, mixture):
    """(conversations, sources, note): the {"messages": [...]} JSONL file `data`, else the mixture's
    decontaminated held-out conversations."""
    if data:
        conversations, sources = load_conversations(data)
        return conversations, sources, f"{data} ({len(conversations)} conversations)"
    return heldout_from_mixture(mixture)


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    try:  # the data before the model: a bad file fails in a second, not after loading a checkpoint
        conversations, sources, note = load_heldout(args.data, args.mixture)
    except (OSError, ValueError) as e:
        stage_error(f"chat_quality: {'--data' if args.data else '--mixture ' + args.mixture}: {e}")
    conversations, sources = conversations[:args.max_conversations], sources[:args.max_conversations]
    if not conversations:
        stage_error(f"chat_quality: no held-out conversations left to evaluate ({note})")
    _, rank, _, _, device = compute_init(device_type_or_exit(parser, args))
    model, tokenizer, _, step = load_model_or_exit("chat_quality", args, device)
    engine = Engine(model, tokenizer, compile=args.compile)
    print0(f"chat quality of {args.source} step {step} on {note}")
    try:
        with autocast_context(device.type, get_compute_dtype(device.type)):
            out = run_chat_quality(model, tokenizer, engine, conversations, sources, max_replies=args.max_replies,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   top_k=args.top_k, seed=args.seed, batch_size=args.batch_size)
    except ValueError as e:  # e.g. no assistant text in the conversations
        stage_error(f"chat_quality: {note}: {e}")
    out["data"] = note
    if rank == 0:
        info = {"source": args.source, "model tag": args.model_tag or "(largest)", "step": step, "data": note}
        print(report_markdown(out, info))
        print(f"wrote {write_report(out, args.source, info)}")
    compute_cleanup()
    return out


if __name__ == "__main__":
    main()
