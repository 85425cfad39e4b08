"""
Evaluate the tokenizer's compression (UTF-8 bytes per token: higher is better) on several kinds of
text, against GPT-2 and GPT-4 (cl100k) when their files are available locally.

    python -m scripts.tok_eval --data=../shared/data/pretrain/wikipedia,../shared/data/pretrain/books,../shared/data/pretrain/reddit

Rows: the validation split of each --data source (English prose), then built-in samples (news,
code, math, science, French, Korean). Nothing is downloaded: reference tokenizers are read from
--ref-dir (tiktoken/r50k_base.tiktoken or gpt2/encoder.json + vocab.bpe; tiktoken/cl100k_base.tiktoken).
"""
import os
import sys

from nanochat.common import make_parser, positive_int
from nanochat.dataset import DataError, iter_documents, parse_data_spec
from nanochat.report import write_section
from nanochat.tokenizer import PATTERNS, Tokenizer, get_tokenizer
from nanochat.tokenizer_import import from_gpt2_files
from tasks.common import get_task_data_dir

# Short samples written for this evaluation.
SAMPLES = {
    "news": """\
The city council voted 7-2 on Tuesday night to extend the downtown tram line by another 4.5 kilometres, \
ending a debate that had dragged on for almost three years. Supporters said the extension would cut \
commuting times for some 30,000 residents of the eastern districts; opponents warned that the projected \
cost of $212 million was likely to rise. Construction is expected to begin next spring, with the first \
trams running by late 2028, according to a statement released by the mayor's office.""",
    "code": """\
def moving_average(values, window=3):
    \"\"\"Return the running mean of `values` over `window` items.\"\"\"
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out

if __name__ == "__main__":
    print(moving_average([1, 2, 3, 4, 5], window=2))  # [1.0, 1.5, 2.5, 3.5, 4.5]
""",
    "math": """\
Let f(x) = 3x^2 - 12x + 7. Completing the square gives f(x) = 3(x - 2)^2 - 5, so the minimum value \
is -5 at x = 2. The roots satisfy (x - 2)^2 = 5/3, i.e. x = 2 ± sqrt(15)/3 ≈ 0.709 or 3.291. \
For the integral, ∫_0^2 f(x) dx = [x^3 - 6x^2 + 7x]_0^2 = 8 - 24 + 14 = -2. \
Check: f'(x) = 6x - 12 = 0 ⇒ x = 2, and f''(x) = 6 > 0, confirming a minimum.""",
    "science": """\
Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent \
reactions, which take place in the thylakoid membranes, water molecules are split, releasing O2 and \
producing ATP and NADPH. The Calvin cycle then uses these carriers in the stroma to fix CO2 into \
three-carbon sugars, catalysed by the enzyme RuBisCO. At 25 °C and typical atmospheric CO2 levels \
(about 420 ppm), roughly a quarter of fixation attempts in C3 plants are lost to photorespiration.""",
    "french": """\
Le petit marché du samedi s'installe dès six heures sur la place de l'église. Les maraîchers déchargent \
leurs cagettes de tomates, de courgettes et de fraises, tandis que le boulanger aligne ses miches encore \
tièdes. Vers dix heures, la foule devient si dense qu'il faut jouer des coudes pour atteindre le stand du \
fromager, où l'on goûte un comté affiné dix-huit mois avant de repartir, le panier bien rempli.""",
    "korean": """\
오늘 아침에는 비가 조금 내렸지만 오후가 되자 하늘이 맑게 개었다. 우리는 공원 근처의 작은 카페에서 만나 \
따뜻한 차를 마시며 다음 주 여행 계획을 세웠다. 기차표는 이미 예매했고, 숙소는 바닷가에서 걸어서 \
오 분 거리에 있는 조용한 민박으로 정했다.""",
}


def load_references(ref_dir):
    """{name: Tokenizer} for the reference tokenizers found under ref_dir."""
    refs = {}
    r50k = os.path.join(ref_dir, "tiktoken", "r50k_base.tiktoken")
    gpt2 = [os.path.join(ref_dir, "gpt2", n) for n in ("encoder.json", "vocab.bpe")]
    cl100k = os.path.join(ref_dir, "tiktoken", "cl100k_base.tiktoken")
    if os.path.exists(r50k):
        refs["GPT-2"] = Tokenizer.from_tiktoken_file(r50k, pattern=PATTERNS["gpt2"], special_tokens={"<|endoftext|>": 50256})
    elif all(os.path.exists(p) for p in gpt2):
        refs["GPT-2"] = from_gpt2_files(*gpt2)
    if os.path.exists(cl100k):
        refs["GPT-4"] = Tokenizer.from_tiktoken_file(cl100k, pattern=PATTERNS["gpt4"],
                                                     special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258,
                                                                     "<|fim_middle|>": 100259, "<|fim_suffix|>": 100260,
                                                                     "<|endofprompt|>": 100276})
    return refs


def prose_texts(spec, max_chars):
    """[(label, text, weight)]: up to max_chars of the validation split of each source in spec."""
    sources = [(None, "reference shards", 1.0)] if spec is None else \
        [(s.path, os.path.basename(s.path.rstrip("/")) or s.path, s.weight) for s in parse_data_spec(spec)]
    out = []
    for path, label, weight in sources:
        parts, n = [], 0
        for doc in iter_documents(path, split="val", infinite=False):
            parts.append(doc[:max_chars - n])
            n += len(parts[-1])
            if n >= max_chars:
                break
        out.append((label, "\n\n".join(parts), weight))
    return out


def compression_table(tokenizers, texts):
    """Markdown table of bytes/token per text and tokenizer, with ours relative to each reference."""
    names = list(tokenizers)
    header = "| text | bytes | " + " | ".join(f"{n} bytes/token" for n in names) + "".join(f" | ours vs {n}" for n in names[1:]) + " |"
    lines = [header, "|---|---:|" + "---:|" * (2 * len(names) - 1)]
    results = {}
    for label, text in texts:
        nbytes = len(text.encode("utf-8"))
        results[label] = bpt = {n: nbytes / max(1, len(tok.encode(text))) for n, tok in tokenizers.items()}
        rel = "".join(f" | {100 * (bpt[names[0]] / bpt[n] - 1):+.1f}%" for n in names[1:])
        lines.append(f"| {label} | {nbytes:,} | " + " | ".join(f"{bpt[n]:.2f}" for n in names) + rel + " |")
    return "\n".join(lines), results


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--data", default=None, help="data spec whose sources' validation splits are evaluated; default: the reference shards")
    parser.add_argument("--max-chars", type=positive_int, default=1_000_000, help="characters of validation text per source")
    parser.add_argument("--ref-dir", default=os.path.join(get_task_data_dir(), "tokenizers"),
                        help="directory with the reference tokenizer files ('' = none)")
    args = parser.parse_args(argv)

    try:
        ours = get_tokenizer()
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}")
    tokenizers = {"ours": ours}
    if args.ref_dir and os.path.isdir(args.ref_dir):
        tokenizers.update(load_references(args.ref_dir))
    missing = [n for n in ("GPT-2", "GPT-4") if n not in tokenizers]
    notes = [f"reference tokenizers not found in {args.ref_dir!r}: {', '.join(missing)}"] if missing else []

    try:
        prose = prose_texts(args.data, args.max_chars)
    except DataError as e:
        if args.data is not None:
            raise SystemExit(f"data error: {e}")
        prose = []
        notes.append(f"no prose rows: {e}")
    texts = [(label, text) for label, text, _ in prose] + list(SAMPLES.items())

    table, results = compression_table(tokenizers, texts)
    metrics = {"vocab_size": ours.get_vocab_size()}
    if prose:  # what scripts.plan reads to turn a token budget into characters of data
        total = sum(w for _, _, w in prose)  # a weight is a share of characters, as in training
        ntok = [len(ours.encode(text)) for _, text, _ in prose]
        tokens_per_char = sum(w / total * n / max(1, len(text)) for (_, text, w), n in zip(prose, ntok))
        metrics["chars_per_token"] = round(1 / tokens_per_char, 4)
        metrics["bytes_per_token"] = round(sum(len(t.encode("utf-8")) for _, t, _ in prose) / sum(ntok), 4)
        notes.append(f"our characters per token on the --data mix (weighted as in training): {metrics['chars_per_token']:.3f}")
    body = (f"Compression in UTF-8 bytes per token (higher is better); our vocab {ours.get_vocab_size():,}"
            + "".join(f", {n} {t.get_vocab_size():,}" for n, t in tokenizers.items() if n != "ours")
            + ". Prose rows are the validation split of each data source.\n\n" + table
            + "".join(f"\n\nnote: {n}" for n in notes))
    print(body)
    write_section("Tokenizer evaluation", body, metrics=metrics)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
