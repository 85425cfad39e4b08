"""
Export a checkpoint and the tokenizer as a Hugging Face NanoChat directory that transformers loads with
AutoModelForCausalLM / AutoTokenizer (no custom code); see docs/hf.md.

    python -m scripts.export_hf -i sft --out=hf/my-chat                 # the largest sft model, last step
    python -m scripts.export_hf -i base -g d20 -s 21400 --out=hf/d20-base --dtype=bf16 --verify

--verify loads the directory with transformers and compares its logits on random tokens with ours on the
same weights. The report card gets a "Hugging Face export" section saying where the export went.
"""
import dataclasses
import os
import sys

import torch

from nanochat.checkpoint import step_dir
from nanochat.common import make_parser, non_negative_int, str2bool
from nanochat.gpt import GPT
from nanochat.hf import HFFormatError, export
from nanochat.tokenizer import TokenizerError
from ._cli import load_model_or_exit

DTYPES = {"": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VERIFY_TOLERANCE = 1e-4  # max |logit difference| / max(1, max |logit|); fp32 measures ~1e-6 (docs/hf.md)


def get_args(argv=None):
    p = make_parser(__doc__)
    # the checkpoint flags of the chat scripts (scripts/_cli.py add_model_source_flags), without the inference ones
    p.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="checkpoint family")
    p.add_argument("-g", "--model-tag", default=None, help="model tag (e.g. d20); default the largest")
    p.add_argument("-s", "--step", type=non_negative_int, default=None, help="checkpoint step; default the last")
    p.add_argument("--checkpoint-dir", default=None,
                   help="export from this checkpoint folder (holding step_* directories) instead of -i/-g")
    p.add_argument("--out", required=True, help="output directory (created; other files in it are left alone)")
    p.add_argument("--dtype", default="", choices=list(DTYPES), help="weights' dtype in the export ('' = as saved)")
    p.add_argument("--verify", type=str2bool, default=False,
                   help="load the export with transformers and compare its logits with ours (needs transformers)")
    return p.parse_args(argv)


def verify(out_dir, state, config, seq_len=32, seed=0):
    """Max |transformers' logits - ours| / max(1, max |ours|) on one random sequence, both in fp32 on the weights
    as exported (a bf16 export is compared with our model on the same rounded weights)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: never ask the hub
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.device("meta"):
        ours = GPT(config)
    ours.to_empty(device="cpu")
    ours.init_weights()  # the rotary tables
    ours.load_state_dict({k: v.float() for k, v in state.items()})
    ours.eval()
    ids = torch.randint(0, config.vocab_size, (1, min(seq_len, config.sequence_len)),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits.float()
    return ((a - b).abs().max() / a.abs().max().clamp(min=1.0)).item()


def main(argv=None):
    args = get_args(argv)
    model, tokenizer, ckpt_dir, step = load_model_or_exit("export_hf", args, "cpu")
    config, path, dtype = model.config, step_dir(ckpt_dir, step), DTYPES[args.dtype]
    state = {k: (v if dtype is None else v.to(dtype)) for k, v in model.state_dict().items()}
    try:
        files = export(state, config, tokenizer, args.out)
    except (HFFormatError, TokenizerError) as e:
        raise SystemExit(f"export_hf: cannot export {path}: {e}")
    except ImportError as e:
        raise SystemExit(f"export_hf: {e}; install safetensors (pip install safetensors, or the dev extra)")
    except OSError as e:
        raise SystemExit(f"export_hf: cannot write {args.out}: {e}")
    out = os.path.abspath(args.out)
    print(f"exported {path} ({args.source}, tag {os.path.basename(ckpt_dir)}, step {step}) to {out}:")
    for name, size in files.items():
        print(f"  {name:24s} {size:>14,} bytes")
    result = {"out": out, "source": args.source, "model_tag": os.path.basename(ckpt_dir), "step": step,
              "files": files, "model_config": dataclasses.asdict(config), "verify_error": None}
    if args.verify:
        try:
            result["verify_error"] = err = verify(out, state, config)
        except ImportError as e:
            raise SystemExit(f"export_hf: --verify needs transformers ({e})")
        print(f"verify: transformers' logits vs ours, max |difference| / max |logit| = {err:.2e} "
              f"(tolerance {VERIFY_TOLERANCE:g})")
        if not err <= VERIFY_TOLERANCE:
            raise SystemExit(f"export_hf: --verify failed: transformers' logits differ from ours by {err:.2e} "
                             f"(relative), above {VERIFY_TOLERANCE:g}; the export in {out} is not faithful")
    from nanochat.report import write_section
    rows = [("directory", f"`{out}`"), ("checkpoint", f"`{path}`"), ("source", args.source),
            ("model tag", result["model_tag"]), ("step", step), ("weights dtype", args.dtype or "as saved"),
            ("model.safetensors bytes", f"{files['model.safetensors']:,}")]
    if result["verify_error"] is not None:
        rows.append(("transformers logits vs ours (relative)", f"{result['verify_error']:.2e}"))
    write_section("Hugging Face export", "| item | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
                  + "\n\nLoad it with `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`.")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
