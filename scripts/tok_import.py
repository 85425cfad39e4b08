"""
Import a BPE tokenizer trained elsewhere into $NANOCHAT_BASE_DIR/tokenizer (replacing what is there).

    python -m scripts.tok_import --tiktoken=my_64k.tiktoken                    # tiktoken ranks file
    python -m scripts.tok_import --tiktoken=cl100k_base.tiktoken --pattern=gpt4
    python -m scripts.tok_import --hf-json=tokenizer.json                      # Hugging Face byte-level BPE
    python -m scripts.tok_import --gpt2-dir=DIR                                # GPT-2's encoder.json + vocab.bpe

Our special tokens (<|bos|>, <|user_start|>, ...) are appended after the highest id when missing.
A tiktoken file does not record its pre-split regex: --pattern names it (nanochat, gpt4, gpt2) or
gives the regex itself. A tokenizer.json carries its own, which --pattern overrides.
"""
import os
import sys

from nanochat.common import make_parser
from nanochat.tokenizer import PATTERNS, Tokenizer, TokenizerError, get_tokenizer_dir
from nanochat.tokenizer_import import from_gpt2_files, from_hf_json


def main(argv=None):
    parser = make_parser(__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiktoken", help="path to a tiktoken BPE ranks file")
    source.add_argument("--hf-json", help="path to a Hugging Face tokenizer.json (byte-level BPE)")
    source.add_argument("--gpt2-dir", help="directory with GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--pattern", default=None,
                        help=f"pre-split regex or one of {sorted(PATTERNS)}; default: nanochat for --tiktoken, the file's own for --hf-json")
    args = parser.parse_args(argv)
    path = args.tiktoken or args.hf_json or args.gpt2_dir
    if not os.path.exists(path):
        parser.error(f"argument {'--tiktoken' if args.tiktoken else '--hf-json' if args.hf_json else '--gpt2-dir'}: no such file or directory: {path}")
    pattern = PATTERNS.get(args.pattern, args.pattern)

    try:
        if args.tiktoken:
            tokenizer = Tokenizer.from_tiktoken_file(path, pattern=pattern or PATTERNS["nanochat"])
        elif args.hf_json:
            tokenizer = from_hf_json(path, pattern=pattern)
        else:
            if args.pattern:
                parser.error("argument --pattern: GPT-2 files always use the gpt2 pattern")
            tokenizer = from_gpt2_files(os.path.join(path, "encoder.json"), os.path.join(path, "vocab.bpe"))
    except (TokenizerError, OSError) as e:
        raise SystemExit(f"error: cannot import {path}: {e}")

    out_dir = get_tokenizer_dir()
    tokenizer.save(out_dir)
    print(f"imported {path}: vocab {tokenizer.get_vocab_size():,}, special tokens {tokenizer.get_special_tokens()}, saved to {out_dir}")
    return tokenizer


if __name__ == "__main__":
    main(sys.argv[1:])
