"""
Byte-level BPE tokenizer in the GPT-4 style: text is pre-split by a regex, merges never cross
split boundaries, and every byte sequence encodes and decodes back exactly.

Training uses the native `rustbpe` trainer: on 50 MB at vocab 32k it was 3.5x faster than Hugging
Face `tokenizers` with identical compression (bench/tokenizer.py, docs/benchmarks.md). Encoding always
goes through tiktoken. On disk a tokenizer is three files that loading cannot execute code from (no pickle):
    ranks.tiktoken    one "base64(token bytes) rank" line per mergeable token (tiktoken's format)
    token_bytes.pt    int32 tensor: UTF-8 byte length of every token id, 0 for special tokens
    meta.json         split pattern, special tokens, vocab size and the files' sha256, written last
A tiktoken ranks file trained elsewhere loads with Tokenizer.from_tiktoken_file; a Hugging Face byte-level
BPE tokenizer.json or GPT-2's encoder.json + vocab.bpe through nanochat/tokenizer_import.py. Either way our
special tokens are added when missing (add_our_special_tokens).
"""
import base64
import functools
import hashlib
import io
import itertools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import tiktoken
import torch

from nanochat.common import atomic_write_bytes, atomic_write_text, get_base_dir, logger
from nanochat.conversation import validate_conversation

SPECIAL_TOKENS = [
    "<|bos|>",  # every document starts with it
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>", "<|output_end|>",  # the tool's output, fed back to the assistant
]

# GPT-4's pre-split, except numbers split into groups of at most 2 digits (not 3): a small
# vocab spends fewer tokens on all the 3-digit numbers.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PATTERNS = {"nanochat": SPLIT_PATTERN, "gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}

# rustbpe logs every 1% of training through Python logging; keep that out of our INFO output
logging.getLogger("rustbpe").setLevel(logging.WARNING)

RANKS_FILE, TOKEN_BYTES_FILE, META_FILE = "ranks.tiktoken", "token_bytes.pt", "meta.json"
FORMAT_NAME, FORMAT_VERSION = "nanochat-tokenizer", 1


class TokenizerError(ValueError):
    """A tokenizer file or directory that cannot be used; the message says which and why."""


# -----------------------------------------------------------------------------
# tiktoken's ranks text format

def parse_ranks(data, source="ranks file"):
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok_b64, rank = line.split()
            tok, rank = base64.b64decode(tok_b64, validate=True), int(rank)
        except ValueError as e:  # wrong field count, bad base64 (binascii.Error), bad int
            raise TokenizerError(f"{source}: line {lineno} is not 'base64-token rank' ({e})") from None
        if not tok or rank < 0:
            raise TokenizerError(f"{source}: line {lineno} has an empty token or a negative rank")
        if tok in ranks:
            raise TokenizerError(f"{source}: line {lineno} repeats token {tok!r}")
        ranks[tok] = rank
    if not ranks:
        raise TokenizerError(f"{source}: no tokens in it")
    return ranks


def read_json(path, prefix=""):
    """json.load of a UTF-8 file; TokenizerError "<prefix><path>: not valid JSON (...)" when it is not (bad
    bytes, a number too long to convert, nesting too deep for the parser)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:
        raise TokenizerError(f"{prefix}{path}: not valid JSON ({str(e)[:200] or type(e).__name__})") from None


def add_our_special_tokens(mergeable_ranks, special_tokens):
    """A tokenizer made elsewhere keeps its special tokens ({name: id}); ours that are missing are appended
    after the highest id, so its own ids never move."""
    special_tokens = dict(special_tokens or {})
    next_id = max(list(mergeable_ranks.values()) + list(special_tokens.values())) + 1
    missing = [name for name in SPECIAL_TOKENS if name not in special_tokens]
    return {**special_tokens, **{name: next_id + i for i, name in enumerate(missing)}}

# -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _thread_pool(pid, num_threads):
    """The batch-encoding threads, kept across calls. Keyed by pid: after a fork the parent's threads do not
    exist in the child, which makes its own."""
    return ThreadPoolExecutor(num_threads, thread_name_prefix="nanochat-tokenizer")


class Tokenizer:
    """Encodes with tiktoken; trains with rustbpe; renders chat conversations into (ids, mask)."""

    def __init__(self, mergeable_ranks, special_tokens, pattern=SPLIT_PATTERN):
        if not isinstance(pattern, str) or not pattern:
            raise TokenizerError("split pattern must be a non-empty regex string")
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise TokenizerError(f"the vocabulary lacks {len(missing)} of the 256 single bytes (first: {missing[0]}) "
                                 "as tokens, so some text could not be encoded")
        ids = set(mergeable_ranks.values())
        if len(ids) != len(mergeable_ranks):
            raise TokenizerError("two mergeable tokens share a rank")
        # ids index the embedding and tiktoken's tables: a stray huge id would size them (or overflow)
        most = 2 * (len(mergeable_ranks) + len(special_tokens)) + 1024
        stray = [i for i in itertools.chain(ids, special_tokens.values()) if not 0 <= i < most]
        if stray:
            raise TokenizerError(f"token id {stray[0]} is out of range: ids must be below {most} for a vocabulary "
                                 f"of {len(mergeable_ranks) + len(special_tokens)} tokens")
        clash = [name for name, i in special_tokens.items() if i in ids]
        if clash or len(set(special_tokens.values())) != len(special_tokens):
            raise TokenizerError(f"special token ids collide with other tokens: {clash or sorted(special_tokens)}")
        self.mergeable_ranks = mergeable_ranks
        self.special_tokens = dict(special_tokens)
        self.pattern = pattern
        try:
            self.enc = tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens)
        except (ValueError, OverflowError) as e:  # tiktoken rejects a bad regex
            raise TokenizerError(f"tiktoken rejected the tokenizer: {e}") from None
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}
        self.train_stats = None  # {"docs", "chars"} when made by train_from_iterator
        # tiktoken keeps one regex per thread-id slot, and a regex is fastest for the first thread
        # that uses it; claim this thread's slot now, before any batch worker can.
        self.enc.encode_ordinary("warm up")

    # --- construction --------------------------------------------------------

    @classmethod
    def train_from_iterator(cls, text_iterator, vocab_size, pattern=SPLIT_PATTERN):
        """Train byte-level BPE on an iterator of strings. vocab_size counts the 256 byte tokens,
        the merges and our special tokens."""
        import rustbpe
        min_size = 256 + len(SPECIAL_TOKENS)
        if not isinstance(vocab_size, int) or vocab_size < min_size:
            raise ValueError(f"vocab_size must be at least {min_size} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size!r}")
        stats = {"docs": 0, "chars": 0}

        def counted():
            for i, text in enumerate(text_iterator):
                if not isinstance(text, str):
                    raise TypeError(f"the text iterator must yield strings; item {i} is {type(text).__name__}")
                stats["docs"] += 1
                stats["chars"] += len(text)
                yield text

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(counted(), vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
        if stats["chars"] == 0:
            raise ValueError(f"empty corpus: the text iterator gave {stats['docs']} documents and no characters to train on")
        ranks = {bytes(tok): rank for tok, rank in trainer.get_mergeable_ranks()}
        if len(ranks) < vocab_size - len(SPECIAL_TOKENS):
            logger.warning(f"the corpus ({stats['chars']:,} chars) only supports {len(ranks) - 256} merges; "
                           f"vocab is {len(ranks) + len(SPECIAL_TOKENS)} instead of {vocab_size}")
        tok = cls(ranks, {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}, pattern)
        tok.train_stats = stats
        return tok

    @classmethod
    def from_directory(cls, path):
        """Load a tokenizer saved with save(); checks every file against meta.json."""
        meta = _read_meta(path)
        ranks = parse_ranks(_read_checked(path, RANKS_FILE, meta), os.path.join(path, RANKS_FILE))
        tok = cls(ranks, meta["special_tokens"], meta["pattern"])
        if tok.get_vocab_size() != meta["vocab_size"]:
            raise TokenizerError(f"corrupt tokenizer at {path}: {META_FILE} says vocab size {meta['vocab_size']}, "
                                 f"the files give {tok.get_vocab_size()}")
        return tok

    @classmethod
    def from_tiktoken_file(cls, path, pattern=SPLIT_PATTERN, special_tokens=None):
        """A tiktoken ranks file (e.g. cl100k_base.tiktoken). `special_tokens` ({name: id}) are kept;
        ours are appended when missing. Pass the pre-split pattern it was trained with
        (PATTERNS["gpt4"] for cl100k, PATTERNS["gpt2"] for r50k/gpt2) for the original tokenization."""
        with open(path, "rb") as f:
            ranks = parse_ranks(f.read(), path)
        return cls(ranks, add_our_special_tokens(ranks, special_tokens), pattern)

    # --- saving --------------------------------------------------------------

    def save(self, directory):
        """Write the three files, each atomically, meta.json last: it holds the others' sha256, so a
        reader never accepts a mix of old and new files."""
        buf = io.BytesIO()
        torch.save(self.token_bytes(), buf)
        ranks = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        files = {RANKS_FILE: b"".join(b"%s %d\n" % (base64.b64encode(tok), rank) for tok, rank in ranks),
                 TOKEN_BYTES_FILE: buf.getvalue()}
        for name, data in files.items():
            atomic_write_bytes(os.path.join(directory, name), data)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "vocab_size": self.get_vocab_size(),
                "pattern": self.pattern, "special_tokens": self.special_tokens,
                "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
        atomic_write_text(os.path.join(directory, META_FILE), json.dumps(meta, indent=1, ensure_ascii=False))
        logger.info(f"saved tokenizer (vocab {self.get_vocab_size():,}) to {directory}")

    def token_bytes(self):
        """int32 tensor [vocab_size]: UTF-8 byte length of each token, 0 for special tokens and unused ids."""
        lengths = torch.zeros(self.get_vocab_size(), dtype=torch.int32)
        ranks = self.mergeable_ranks
        lengths[list(ranks.values())] = torch.tensor([len(tok) for tok in ranks], dtype=torch.int32)
        return lengths

    # --- encoding ------------------------------------------------------------

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_special_tokens(self):
        """Names of the special tokens, in id order."""
        return sorted(self.special_tokens, key=self.special_tokens.get)

    def encode_special(self, name):
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(f"unknown special token {name!r}; known: {self.get_special_tokens()}") from None

    def get_bos_token_id(self):
        return self.encode_special("<|bos|>")

    def _resolve(self, token):
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and 0 <= token < self.get_vocab_size():
            return token
        raise ValueError(f"prepend/append must be a token id in [0, {self.get_vocab_size()}) or a special token name, got {token!r}")

    def _add_ends(self, ids, prepend, append):  # in place: no copy of a long list
        if prepend is not None:
            ids.insert(0, self._resolve(prepend))
        if append is not None:
            ids.append(self._resolve(append))
        return ids

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """str -> list of ids, or list of str -> list of lists. Special-token strings inside the text
        are encoded as plain text, never as special tokens."""
        if isinstance(text, str):
            return self._add_ends(self.enc.encode_ordinary(text), prepend, append)
        if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"encode() takes a string or a list of strings, got {type(text).__name__}")
        return [self._add_ends(ids, prepend, append) for ids in self._encode_batch(list(text), num_threads)]

    def _encode_batch(self, texts, num_threads):
        """Like tiktoken's encode_ordinary_batch, but with a thread pool kept across calls (no thread
        start-up per call, and its threads keep their fast regex slots) and texts handed out in a few
        contiguous chunks of similar size instead of one task each."""
        if num_threads <= 1 or len(texts) <= 1:
            return [self.enc.encode_ordinary(t) for t in texts]
        size = sum(map(len, texts)) / (4 * num_threads) + 1  # characters per chunk
        ends = itertools.accumulate(map(len, texts))
        groups = itertools.groupby(zip(ends, texts), key=lambda end_text: end_text[0] // size)
        chunks = [[t for _, t in group] for _, group in groups]
        encode = self.enc.encode_ordinary  # releases the GIL while it works
        parts = _thread_pool(os.getpid(), num_threads).map(lambda chunk: [encode(t) for t in chunk], chunks)
        return list(itertools.chain.from_iterable(parts))

    __call__ = encode

    def decode(self, ids):
        """ids -> str; byte sequences that are not valid UTF-8 become U+FFFD, so it never raises on valid ids."""
        if not isinstance(ids, list):
            ids = [int(i) for i in ids]
        try:
            return self.enc.decode(ids, errors="replace")
        except (KeyError, ValueError, OverflowError, TypeError):
            valid = set(self.mergeable_ranks.values()) | set(self._id_to_special)
            bad = [i for i in ids if not isinstance(i, int) or i not in valid]
            raise ValueError(f"cannot decode: invalid token id(s) {bad[:5]} (vocab size {self.get_vocab_size()})") from None

    def id_to_token(self, idx):
        """The token's text (special tokens by name; a partial UTF-8 sequence shows as U+FFFD)."""
        if idx in self._id_to_special:
            return self._id_to_special[idx]
        try:
            return self.enc.decode_single_token_bytes(idx).decode("utf-8", errors="replace")
        except (KeyError, ValueError, OverflowError, TypeError):
            raise ValueError(f"invalid token id {idx!r} (vocab size {self.get_vocab_size()})") from None

    # --- chat conversations --------------------------------------------------

    @staticmethod
    def _check_messages(conversation):
        """The messages, checked by nanochat.conversation (strict=False: a bare list, keys we do not render
        and empty content are fine), a leading system message merged into the first user turn (a new
        dict: the caller's conversation is not modified)."""
        messages = validate_conversation(conversation, strict=False)
        if messages[0]["role"] != "system":
            return messages
        return [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] + messages[2:]

    def _render(self, messages):
        s = self.encode_special
        ids, mask = [s("<|bos|>")], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for m in messages:
            if m["role"] == "user":
                add([s("<|user_start|>")] + self.encode(m["content"]) + [s("<|user_end|>")], 0)
                continue
            add([s("<|assistant_start|>")], 0)
            parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
            for part in parts:
                if part["type"] == "text":
                    add(self.encode(part["text"]), 1)
                elif part["type"] == "python":  # the assistant writes the tool call: learned
                    add([s("<|python_start|>")] + self.encode(part["text"]) + [s("<|python_end|>")], 1)
                else:  # the tool's output comes from outside at inference: not learned
                    add([s("<|output_start|>")] + self.encode(part["text"]) + [s("<|output_end|>")], 0)
            add([s("<|assistant_end|>")], 1)
        return ids, mask

    def render_conversation(self, conversation, max_tokens=2048):
        """(ids, mask), truncated to max_tokens; mask is 1 on the tokens the assistant must learn."""
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        ids, mask = self._render(self._check_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """ids that prime the assistant's next reply: a final assistant message, if any, is dropped
        and <|assistant_start|> appended."""
        messages = self._check_messages(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        return ids + [self.encode_special("<|assistant_start|>")]

    def visualize_tokenization(self, ids, mask, color=True):
        """One string showing token boundaries and the mask: with color, learned tokens are green and
        the rest grey; without, learned tokens are wrapped in [ ] and tokens separated by |."""
        if len(ids) != len(mask):
            raise ValueError(f"ids and mask differ in length ({len(ids)} vs {len(mask)})")
        texts = [self.id_to_token(i) for i in ids]
        if color:
            return "".join(("\033[92m" if m else "\033[90m") + t + "\033[0m" for t, m in zip(texts, mask))
        return "|".join(f"[{t}]" if m else t for t, m in zip(texts, mask))


class StreamDecoder:
    """Turns token ids, pushed one at a time, into text pieces whose concatenation is exactly
    tokenizer.decode(all ids), for replies shown as they are generated (chat_cli, the web server). A
    character whose bytes straddle tokens is held back until complete: ids since the last clean cut are
    decoded together and a trailing U+FFFD (an incomplete sequence, or an invalid one only the next bytes
    can tell apart) is not emitted yet. Uses only decode(ids)."""

    MAX_WINDOW = 64  # give up waiting (invalid bytes) after this many tokens

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.window = []  # ids since the last clean cut
        self.emitted = 0  # characters of decode(window) already returned

    def push(self, token_id):
        self.window.append(token_id)
        text = self.tokenizer.decode(self.window)
        complete = len(text.rstrip("\ufffd"))
        if complete == len(text) or len(self.window) >= self.MAX_WINDOW:  # a clean cut: emit everything
            piece = text[self.emitted:]
            self.window, self.emitted = [], 0
            return piece
        piece = text[self.emitted:complete]
        self.emitted = max(self.emitted, complete)
        return piece

    def flush(self):
        """Whatever is held back (undecodable bytes become U+FFFD)."""
        piece = self.tokenizer.decode(self.window)[self.emitted:] if self.window else ""
        self.window, self.emitted = [], 0
        return piece

# -----------------------------------------------------------------------------

def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    """The tokenizer stored in $NANOCHAT_BASE_DIR/tokenizer."""
    return Tokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device="cpu"):
    """int32 tensor [vocab_size] on `device`: UTF-8 bytes per token id, 0 for special tokens (for bits per byte)."""
    path = get_tokenizer_dir()
    meta = _read_meta(path)
    data = _read_checked(path, TOKEN_BYTES_FILE, meta)
    try:
        token_bytes = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        token_bytes = e
    if not isinstance(token_bytes, torch.Tensor) or token_bytes.shape != (meta["vocab_size"],):
        raise TokenizerError(f"corrupt tokenizer file {os.path.join(path, TOKEN_BYTES_FILE)}: expected a tensor of "
                             f"{meta['vocab_size']} byte counts")
    return token_bytes.to(device)


def _read_meta(path):
    """meta.json of the tokenizer directory `path`, checked for the format, version and the fields loading needs."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        where = (f"no tokenizer at {path}: {META_FILE} is missing" if os.path.isdir(path)
                 else f"no tokenizer directory at {path}")
        raise FileNotFoundError(f"{where}. Train one with `python -m scripts.tok_train` or import one with "
                                "`python -m scripts.tok_import --tiktoken=PATH` (or --hf-json=PATH)")
    meta = read_json(meta_path, "corrupt tokenizer file ")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise TokenizerError(f"corrupt tokenizer file {meta_path}: not a {FORMAT_NAME} metadata file")
    if meta.get("version") != FORMAT_VERSION:
        raise TokenizerError(f"{meta_path}: format version {meta.get('version')!r}, this code reads version {FORMAT_VERSION}")
    fields = {"pattern": str, "special_tokens": dict, "vocab_size": int, "sha256": dict}
    missing = [k for k in fields if k not in meta]
    if missing:
        raise TokenizerError(f"corrupt tokenizer file {meta_path}: missing field {missing[0]!r}")
    wrong = [k for k, kind in fields.items() if not isinstance(meta[k], kind) or isinstance(meta[k], bool)]
    if wrong or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                        for k, v in meta["special_tokens"].items()):
        raise TokenizerError(f"corrupt tokenizer file {meta_path}: {(wrong or ['special_tokens'])[0]} "
                             "has the wrong type")
    return meta


def _read_checked(path, name, meta):
    """The bytes of file `name` of the tokenizer directory `path`, checked against the sha256 in its meta.json."""
    file_path = os.path.join(path, name)
    if not os.path.exists(file_path):
        raise FileNotFoundError(f"tokenizer at {path} is incomplete: {name} is missing")
    with open(file_path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != meta["sha256"].get(name):
        raise TokenizerError(f"corrupt tokenizer file {file_path}: its sha256 does not match {META_FILE} "
                             "(modified or partially written); train or import the tokenizer again")
    return data
