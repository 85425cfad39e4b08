"""
Train the byte-level BPE tokenizer and save it to $NANOCHAT_BASE_DIR/tokenizer.

    python -m scripts.tok_train                                   # the downloaded reference shards
    python -m scripts.tok_train --vocab-size=65536 \\
        --data=../shared/data/pretrain/wikipedia:45,../shared/data/pretrain/books:40,../shared/data/pretrain/reddit:15

Documents stream from the training split of --data (see nanochat/dataset.py for the spec), each
cut to --doc-cap characters, until --max-chars characters have been read.
"""
import sys
import time

from nanochat.common import make_parser, number_type, positive_int
from nanochat.dataset import DataError, iter_documents
from nanochat.report import write_section
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer_dir


def training_texts(documents, max_chars, doc_cap):
    """Documents in pieces of at most doc_cap characters, stopping once max_chars characters have been
    given. Long documents are split, not truncated: the mixture's weights are shares of characters,
    and cutting a 1 MB book to its first doc_cap characters would all but drop books from the mix."""
    total = 0
    for doc in documents:
        for start in range(0, len(doc), doc_cap):
            piece = doc[start:start + doc_cap]
            yield piece
            total += len(piece)
            if total >= max_chars:
                return


def main(argv=None):
    parser = make_parser(__doc__)
    min_vocab = 256 + len(SPECIAL_TOKENS)  # the byte tokens and the special tokens
    vocab_size = number_type(int, lambda n: n >= min_vocab, f"an integer >= {min_vocab}", "vocab_size")
    parser.add_argument("--vocab-size", type=vocab_size, default=65536, help="vocab size, counting the 256 byte tokens and the special tokens")
    parser.add_argument("--max-chars", type=positive_int, default=2_000_000_000, help="train on at most this many characters")
    parser.add_argument("--doc-cap", type=positive_int, default=10_000, help="feed documents to the trainer in pieces of at most this many characters")
    parser.add_argument("--data", default=None, help="data spec PATH[:WEIGHT][,PATH[:WEIGHT]...]; default: the reference shards in $NANOCHAT_BASE_DIR/base_data")
    args = parser.parse_args(argv)

    try:
        documents = iter_documents(args.data, split="train", infinite=False)
        t0 = time.time()
        tokenizer = Tokenizer.train_from_iterator(training_texts(documents, args.max_chars, args.doc_cap), args.vocab_size)
        train_time = time.time() - t0
    except DataError as e:
        raise SystemExit(f"data error: {e}")
    except ValueError as e:  # e.g. an empty corpus
        raise SystemExit(f"error: {e}")
    stats = tokenizer.train_stats
    print(f"trained on {stats['chars']:,} characters from {stats['docs']:,} documents in {train_time:.1f}s")

    out_dir = get_tokenizer_dir()
    tokenizer.save(out_dir)

    token_bytes = tokenizer.token_bytes()
    lengths = token_bytes[token_bytes > 0].float()
    rows = [("vocab size", f"{tokenizer.get_vocab_size():,}"), ("special tokens", len(tokenizer.get_special_tokens())),
            ("documents", f"{stats['docs']:,}"), ("characters", f"{stats['chars']:,}"),
            ("max chars / doc cap", f"{args.max_chars:,} / {args.doc_cap:,}"),
            ("data", args.data or "reference shards"), ("training time", f"{train_time:.1f}s"),
            ("token bytes min / max", f"{int(lengths.min())} / {int(lengths.max())}"),
            ("token bytes mean / std", f"{lengths.mean():.2f} / {lengths.std():.2f}"), ("saved to", out_dir)]
    body = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    print(body)
    write_section("Tokenizer training", body, metrics={"vocab_size": tokenizer.get_vocab_size(), "train_chars": stats["chars"],
                                                        "train_docs": stats["docs"], "train_seconds": round(train_time, 2)})
    return tokenizer


if __name__ == "__main__":
    main(sys.argv[1:])
