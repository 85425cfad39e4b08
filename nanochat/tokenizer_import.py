"""
Byte-level BPE tokenizers trained elsewhere, as nanochat Tokenizers: a Hugging Face tokenizer.json, or GPT-2's
original encoder.json + vocab.bpe (a tiktoken ranks file needs none of this: Tokenizer.from_tiktoken_file).

Both formats spell each token in GPT-2's byte-level alphabet (every byte shown as one printable character)
and list the merges in priority order. tiktoken instead wants each token's bytes with a rank, and merges the
adjacent pair whose concatenation has the lowest rank; keeping the ids as ranks reproduces the original BPE
as long as ids grow with merge order, which ranks_from_byte_level checks. Our special tokens are appended
after the highest id when missing. Used by scripts/tok_import.py and scripts/tok_eval.py.
"""
from nanochat.common import logger
from nanochat.tokenizer import GPT2_PATTERN, Tokenizer, TokenizerError, add_our_special_tokens, read_json

# -----------------------------------------------------------------------------
# GPT-2's byte-level alphabet and byte-level BPE -> tiktoken ranks


def byte_level_chars():
    """{byte value: the character that stands for it}: printable Latin-1 bytes stand for themselves, the
    others for the characters from U+0100 on, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}


def ranks_from_byte_level(vocab, merges, specials, source):
    """Byte-level BPE (vocab: token string -> id, merges in priority order) -> (tiktoken ranks, {special: id}).
    TokenizerError naming `source` when it is not a byte-level BPE or its ids do not follow merge order.
    (A vocabulary without all 256 single bytes is rejected by the Tokenizer built from the ranks.)"""
    char_to_byte = {c: b for b, c in byte_level_chars().items()}

    def to_bytes(token, what):
        try:
            return bytes(char_to_byte[c] for c in token)
        except KeyError as e:
            raise TokenizerError(f"{source}: {what} has character {e.args[0]!r} outside the "
                                 "byte-level alphabet") from None

    ranks, special_tokens = {}, {}
    for token, idx in vocab.items():
        if not isinstance(idx, int) or idx < 0:
            raise TokenizerError(f"{source}: token {token!r} has id {idx!r}, expected a non-negative integer")
        if token in specials:
            special_tokens[token] = idx
        else:
            ranks[to_bytes(token, f"not a byte-level BPE vocabulary: token {token!r}")] = idx
    last, produced = -1, set()
    for i, pair in enumerate(merges):
        if len(pair) != 2:
            raise TokenizerError(f"{source}: merge {i} {pair!r} is not a pair of tokens")
        a, b = pair
        merged = to_bytes(a + b, f"merge {i} ({a!r}, {b!r})")
        if merged not in ranks:
            raise TokenizerError(f"{source}: merge {i} ({a!r}, {b!r}) produces a token that is not in the vocabulary")
        if merged in produced:
            continue  # a second route to the same token; the first one fixed its priority
        produced.add(merged)
        if ranks[merged] <= last:
            raise TokenizerError(f"{source}: token ids do not follow merge order (merge {i} ({a!r}, {b!r}) -> id "
                                 f"{ranks[merged]}); tiktoken ranks cannot reproduce this BPE")
        last = ranks[merged]
    unreachable = [tok for tok in ranks if len(tok) > 1 and tok not in produced]
    if unreachable:
        raise TokenizerError(f"{source}: {len(unreachable)} multi-byte token(s) are produced by no merge "
                             f"(first: {unreachable[0]!r}); is it a byte-level BPE?")
    return ranks, special_tokens

# -----------------------------------------------------------------------------
# Hugging Face tokenizer.json


def _hf_pattern(steps, path):
    for step in steps:
        if step.get("type") == "Split":
            regex = (step.get("pattern") or {}).get("Regex")
            if not regex or step.get("behavior") != "Isolated" or step.get("invert"):
                raise TokenizerError(f"{path}: unsupported Split pre-tokenizer {step}; pass pattern= explicitly")
            return regex
    if any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        return GPT2_PATTERN  # ByteLevel's built-in split is GPT-2's
    raise TokenizerError(f"{path}: no regex pre-split found; pass pattern= explicitly")


def from_hf_json(path, pattern=None):
    """A Tokenizer from a Hugging Face tokenizer.json holding a byte-level BPE. Parsed here, so the `tokenizers`
    package is not needed. Its added tokens become special tokens (with their ids); ours are appended
    when missing. Unlike HF, which cuts added tokens out of any text, plain text never yields them.
    `pattern` overrides the file's own pre-split regex."""
    cfg = read_json(path)
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "merges" not in model:
        raise TokenizerError(f"{path}: not a BPE tokenizer (model type {model.get('type') if isinstance(model, dict) else None!r})")
    if not isinstance(model.get("vocab"), dict) or not isinstance(model["merges"], list):
        raise TokenizerError(f"{path}: model.vocab must be an object and model.merges a list")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{path}: BPE with byte_fallback / subword prefixes is not byte-level BPE")
    pre = cfg.get("pre_tokenizer") or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]  # ({} is no step)
    if not any(s.get("type") == "ByteLevel" for s in steps) and (cfg.get("decoder") or {}).get("type") != "ByteLevel":
        raise TokenizerError(f"{path}: not a byte-level BPE (no ByteLevel pre-tokenizer or decoder)")
    if cfg.get("normalizer"):
        logger.warning(f"{path}: its normalizer ({cfg['normalizer'].get('type')}) is not applied by tiktoken")
    if any(s.get("type") == "ByteLevel" and s.get("add_prefix_space") for s in steps):
        logger.warning(f"{path}: its ByteLevel add_prefix_space is not applied: text is encoded as given")
    if pattern is None:
        pattern = _hf_pattern(steps, path)
    try:
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        added = {t["content"]: t["id"] for t in cfg.get("added_tokens") or []}
    except (AttributeError, KeyError, TypeError) as e:
        raise TokenizerError(f"{path}: malformed merges or added_tokens ({e!r})") from None
    ranks, specials = ranks_from_byte_level({**model["vocab"], **added}, merges, set(added), path)
    return Tokenizer(ranks, add_our_special_tokens(ranks, specials), pattern)

# -----------------------------------------------------------------------------
# GPT-2's original files


def from_gpt2_files(encoder_json, vocab_bpe):
    """A Tokenizer from GPT-2's original encoder.json + vocab.bpe; <|endoftext|> is kept as a special token."""
    vocab = read_json(encoder_json)
    if not isinstance(vocab, dict):
        raise TokenizerError(f"{encoder_json}: expected a JSON object of token -> id")
    with open(vocab_bpe, encoding="utf-8") as f:
        merges = [tuple(line.split(" ")) for line in f.read().split("\n") if line and not line.startswith("#version")]
    ranks, specials = ranks_from_byte_level(vocab, merges, {"<|endoftext|>"}, encoder_json)
    return Tokenizer(ranks, add_our_special_tokens(ranks, specials), GPT2_PATTERN)
