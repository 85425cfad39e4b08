"""
Import a Hugging Face NanoChat directory (config.json, model.safetensors, tokenizer.json: what
scripts.export_hf writes, or a published nanochat model downloaded from the hub) as a checkpoint and
tokenizer under $NANOCHAT_BASE_DIR, so it can be evaluated, chatted with, midtrained or finetuned here.

    python -m scripts.import_hf hf/my-chat                        # -> sft_checkpoints/d<depth>/step_000000
    python -m scripts.import_hf hf/d20-base --as=base --model-tag=d20-hf
    python -m scripts.chat_cli -i sft -g d20                      # then use it like any checkpoint

The tokenizer goes to $NANOCHAT_BASE_DIR/tokenizer. A different tokenizer already there is kept, and the
import refused, unless --replace-tokenizer (the checkpoints trained with it would no longer load). An
existing checkpoint of the same stage and tag is never overwritten: pick another --model-tag.
Weights are stored in fp32 (a bf16 or fp16 export converts exactly); export then import is bit-exact.
"""
import dataclasses
import os
import sys

from nanochat.checkpoint import SOURCES, TAG_RE, checkpoints_root, list_complete_steps, save_checkpoint
from nanochat.common import make_parser, non_negative_int, str2bool
from nanochat.hf import HFFormatError, load_dir
from nanochat.tokenizer import Tokenizer, TokenizerError, get_tokenizer_dir


def get_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("dir", help="the NanoChat directory (config.json, model.safetensors, tokenizer.json)")
    p.add_argument("--as", dest="stage", default="sft", choices=list(SOURCES),
                   help="checkpoint family to import into (base to midtrain it, sft to chat with or finetune it)")
    p.add_argument("--model-tag", default=None, help="checkpoint directory name (default: d<depth>)")
    p.add_argument("--step", type=non_negative_int, default=0, help="step number the checkpoint is saved as")
    p.add_argument("--replace-tokenizer", type=str2bool, default=False,
                   help="replace a different tokenizer already in $NANOCHAT_BASE_DIR/tokenizer")
    return p.parse_args(argv)


def same_tokenizer(a, b):
    return a.mergeable_ranks == b.mergeable_ranks and a.special_tokens == b.special_tokens and a.pattern == b.pattern


def main(argv=None):
    args = get_args(argv)
    if args.model_tag is not None and (not TAG_RE.fullmatch(args.model_tag) or ".." in args.model_tag):
        raise SystemExit(f"import_hf: --model-tag {args.model_tag!r} must be a plain name (letters, digits, . _ -)")
    try:
        config, state, tokenizer = load_dir(args.dir)
    except ImportError as e:
        raise SystemExit(f"import_hf: {e}; install safetensors (pip install safetensors, or the dev extra)")
    except (HFFormatError, TokenizerError, OSError) as e:
        raise SystemExit(f"import_hf: cannot import {args.dir}: {e}")
    tag = args.model_tag or f"d{config.n_layer}"
    ckpt_dir = os.path.join(checkpoints_root(args.stage), tag)
    if list_complete_steps(ckpt_dir):
        raise SystemExit(f"import_hf: {ckpt_dir} already holds checkpoints; choose another --model-tag")
    tok_dir = get_tokenizer_dir()
    write_tokenizer = True
    if os.path.exists(os.path.join(tok_dir, "meta.json")):
        try:
            existing = Tokenizer.from_directory(tok_dir)
        except (TokenizerError, OSError) as e:
            existing = e
        write_tokenizer = not (isinstance(existing, Tokenizer) and same_tokenizer(existing, tokenizer))
        if write_tokenizer and not args.replace_tokenizer:
            raise SystemExit(f"import_hf: {tok_dir} holds a different tokenizer than {args.dir}/tokenizer.json; the "
                             "checkpoints trained with it need it. Use another NANOCHAT_BASE_DIR, or pass "
                             "--replace-tokenizer to replace it")
    if write_tokenizer:
        tokenizer.save(tok_dir)
    meta = {"model_config": dataclasses.asdict(config), "tokenizer_vocab_size": tokenizer.get_vocab_size(),
            "imported_from": os.path.abspath(args.dir)}
    path = save_checkpoint(ckpt_dir, args.step, state, None, meta)
    print(f"imported {args.dir}: {args.stage} checkpoint {path} (depth {config.n_layer}, width {config.n_embd}, "
          f"vocab {config.vocab_size:,}); tokenizer {'saved to' if write_tokenizer else 'already in'} {tok_dir}")
    print(f"use it with: -i {args.stage} -g {tag}" + (" (e.g. python -m scripts.chat_cli -i sft -g " + tag + ")"
                                                       if args.stage == "sft" else ""))
    from nanochat.report import write_section
    write_section("Hugging Face import", f"| item | value |\n|---|---|\n| directory | `{os.path.abspath(args.dir)}` |\n"
                  f"| checkpoint | `{path}` |\n| tokenizer | {'written' if write_tokenizer else 'unchanged'} |")
    return {"checkpoint": path, "stage": args.stage, "model_tag": tag, "step": args.step,
            "tokenizer_written": write_tokenizer, "model_config": meta["model_config"]}


if __name__ == "__main__":
    main(sys.argv[1:])
