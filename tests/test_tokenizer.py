"""
Tokenizer tests: exact round trips (property-based and on real text), special tokens, conversation
rendering, external formats, the saved format and its error messages, and the three scripts.
Most use conftest's session `tokenizer` (vocab 4096, trained on the in-repo text in tests/fixtures); the
compression figure uses `mix_tokenizer` (the same size, trained on the shared English mix).
"""
import json
import os
import re
import subprocess
import sys

import pytest
import regex
import tiktoken
from tiktoken.load import load_tiktoken_bpe
import torch
from hypothesis import given, settings, strategies as st

from conftest import FIXTURE_TEXT, REPO_ROOT, TEST_VOCAB_SIZE, require_shared_data
from nanochat.tokenizer import (GPT2_PATTERN, GPT4_PATTERN, META_FILE, RANKS_FILE, SPECIAL_TOKENS, SPLIT_PATTERN,
                                TOKEN_BYTES_FILE, Tokenizer, TokenizerError, get_token_bytes, get_tokenizer,
                                get_tokenizer_dir, parse_ranks)
from nanochat.tokenizer_import import byte_level_chars, from_gpt2_files, from_hf_json

# -----------------------------------------------------------------------------
# Random text: astral-plane characters, combining marks, mixed scripts, whitespace runs.

_no_surrogates = st.characters(blacklist_categories=("Cs",))  # lone surrogates are not text
_astral = st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, blacklist_categories=("Cs", "Cn"))
_combining = st.characters(whitelist_categories=("Mn", "Mc", "Me"))
_whitespace = st.sampled_from([" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", " \n ", "\u00a0", "\u3000", "\u2028", "\x0b"])
_words = st.sampled_from(["the", " The", "don't", "I'LL", " 12345", "3.14159", "naïve", "Straße", "日本語", "русский",
                          "العربية", "हिन्दी", "한국어", "e\u0301", "👩\u200d👩\u200d👧", "🇫🇷", "<|bos|>", "<|user_end|>",
                          "    def f():", "\u202e", "\ufeff", "\x00"])
random_text = st.lists(st.one_of(_no_surrogates, _astral, _combining, _whitespace, _words), max_size=40).map("".join)

PROPERTY = settings(max_examples=150, deadline=None)


@PROPERTY
@given(text=random_text)
def test_roundtrip_random_unicode(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)


@PROPERTY
@given(text=random_text)
def test_merges_never_cross_split_boundaries(tokenizer, text):
    pieces = regex.findall(SPLIT_PATTERN, text)
    assert "".join(pieces) == text
    assert tokenizer.encode(text) == [t for p in pieces for t in tokenizer.encode(p)]


@PROPERTY
@given(data=st.data())
def test_decoding_any_valid_ids_never_raises(tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, tokenizer.get_vocab_size() - 1), max_size=40))
    text = tokenizer.decode(ids)
    assert isinstance(text, str)
    for i in ids[:5]:
        assert isinstance(tokenizer.id_to_token(i), str)


@PROPERTY
@given(parts=st.lists(st.one_of(random_text, st.sampled_from(SPECIAL_TOKENS)), max_size=8))
def test_special_tokens_never_come_from_plain_text(tokenizer, parts):
    text = "".join(parts)
    ids = tokenizer.encode(text)
    specials = {tokenizer.encode_special(s) for s in SPECIAL_TOKENS}
    assert not specials & set(ids)
    assert tokenizer.decode(ids) == text


def test_literal_special_token_text_is_plain_text(tokenizer):
    text = "say <|bos|><|assistant_end|> please"
    ids = tokenizer.encode(text)
    assert tokenizer.get_bos_token_id() not in ids and tokenizer.encode_special("<|assistant_end|>") not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([tokenizer.get_bos_token_id()]) == "<|bos|>"


def test_invalid_ids_are_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="invalid token id"):
        tokenizer.decode([0, tokenizer.get_vocab_size()])
    with pytest.raises(ValueError, match="invalid token id"):
        tokenizer.id_to_token(-1)


def test_partial_utf8_decodes_with_replacement(tokenizer):
    ids = tokenizer.encode("日本")
    single_bytes = [tokenizer.mergeable_ranks[bytes([b])] for b in "日".encode("utf-8")]
    assert tokenizer.decode(single_bytes[:2]) == "\ufffd"  # never raises on half a character
    assert tokenizer.decode(ids) == "日本"

# -----------------------------------------------------------------------------
# Real text and the encode() interface


def _val_texts(max_chars=200_000):
    """Validation text of each shared source (documents cut into ~10k-char pieces, as training sees them)."""
    from nanochat.dataset import iter_documents
    texts = []
    for name in ("wikipedia", "books", "reddit"):
        n = 0
        for doc in iter_documents(require_shared_data("pretrain", name), split="val", infinite=False):
            for i in range(0, len(doc), 10_000):
                texts.append(doc[i:i + 10_000])
                n += len(texts[-1])
            if n >= max_chars:
                break
    return texts


def test_roundtrip_and_compression_on_shared_english(mix_tokenizer):
    tokenizer = mix_tokenizer
    texts = _val_texts()
    rows = tokenizer.encode(texts, num_threads=4)
    assert [tokenizer.decode(r) for r in rows] == texts
    assert rows == [tokenizer.encode(t) for t in texts]  # batch == one at a time
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    assert nbytes / sum(map(len, rows)) > 3.0  # a 4k English BPE: ~3.3 bytes/token; far less means broken merges


def test_encode_prepend_append_and_batches(tokenizer):
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    plain = tokenizer.encode("hello world")
    assert tokenizer.encode("hello world", prepend=bos, append="<|assistant_end|>") == [bos] + plain + [end]
    assert tokenizer.encode("hello world", prepend="<|bos|>") == [bos] + plain
    assert tokenizer.encode(["hello world", ""], prepend=bos, num_threads=2) == [[bos] + plain, [bos]]
    assert tokenizer.encode([]) == []
    assert tokenizer("hello world") == plain
    many = [f"document number {i} " * (i % 7) for i in range(50)]
    assert tokenizer.encode(many, num_threads=3) == tokenizer.encode(many, num_threads=1)
    with pytest.raises(ValueError, match="unknown special token"):
        tokenizer.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match="prepend/append"):
        tokenizer.encode("x", append=tokenizer.get_vocab_size())
    with pytest.raises(TypeError):
        tokenizer.encode(["ok", 3])


def test_vocab_and_special_tokens(tokenizer):
    assert tokenizer.get_vocab_size() == TEST_VOCAB_SIZE
    assert tokenizer.get_special_tokens() == SPECIAL_TOKENS
    ids = [tokenizer.encode_special(s) for s in SPECIAL_TOKENS]
    assert ids == list(range(TEST_VOCAB_SIZE - len(SPECIAL_TOKENS), TEST_VOCAB_SIZE))
    assert tokenizer.get_bos_token_id() == ids[0]
    assert [tokenizer.id_to_token(i) for i in ids] == SPECIAL_TOKENS
    assert all(bytes([b]) in tokenizer.mergeable_ranks for b in range(256))
    assert any(len(tok) >= 4 for tok in tokenizer.mergeable_ranks)  # real merges happened
    # digits split in groups of at most two, whatever merges this small vocab learned
    pieces = [tokenizer.decode([i]) for i in tokenizer.encode("12345 2024 99")]
    assert "".join(pieces) == "12345 2024 99"
    assert all(sum(c.isdigit() for c in p) <= 2 for p in pieces) and len(pieces) >= 6

# -----------------------------------------------------------------------------
# Conversations


def _expect(tok, *parts):
    """parts: (special name | text, mask); text is encoded, a special token is one id."""
    ids, mask = [], []
    for item, m in parts:
        t = [tok.encode_special(item)] if item in SPECIAL_TOKENS else tok.encode(item)
        ids += t
        mask += [m] * len(t)
    return ids, mask


def test_render_multi_turn_with_system_message(tokenizer):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]}
    snapshot = json.dumps(conv)
    ids, mask = tokenizer.render_conversation(conv)
    assert (ids, mask) == _expect(
        tokenizer, ("<|bos|>", 0),
        ("<|user_start|>", 0), ("Be brief.\n\nHi there", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), ("Hello!", 1), ("<|assistant_end|>", 1),
        ("<|user_start|>", 0), ("What is the capital of France?", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), ("Paris.", 1), ("<|assistant_end|>", 1))
    assert json.dumps(conv) == snapshot  # the caller's conversation is not modified
    short_ids, short_mask = tokenizer.render_conversation(conv, max_tokens=7)
    assert (short_ids, short_mask) == (ids[:7], mask[:7])


def test_render_tool_use(tokenizer):
    conv = [
        {"role": "user", "content": "What is 12*34?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me compute."},
            {"type": "python", "text": "12*34"},
            {"type": "python_output", "text": "408"},
            {"type": "text", "text": "It is 408."},
        ]},
    ]
    ids, mask = tokenizer.render_conversation(conv)
    assert (ids, mask) == _expect(
        tokenizer, ("<|bos|>", 0), ("<|user_start|>", 0), ("What is 12*34?", 0), ("<|user_end|>", 0),
        ("<|assistant_start|>", 0), ("Let me compute.", 1),
        ("<|python_start|>", 1), ("12*34", 1), ("<|python_end|>", 1),
        ("<|output_start|>", 0), ("408", 0), ("<|output_end|>", 0),
        ("It is 408.", 1), ("<|assistant_end|>", 1))

    plain = tokenizer.visualize_tokenization(ids, mask, color=False)
    assert plain.startswith("<|bos|>|<|user_start|>|") and plain.endswith("|[<|assistant_end|>]")
    assert "|[<|python_start|>]|" in plain and "|<|output_start|>|" in plain
    assert "\033[92m" in tokenizer.visualize_tokenization(ids, mask)
    with pytest.raises(ValueError, match="differ in length"):
        tokenizer.visualize_tokenization(ids, mask[:-1])


def test_render_for_completion(tokenizer):
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "the answer to be dropped"}]
    prompt = tokenizer.render_for_completion(conv)
    full, _ = tokenizer.render_conversation(conv[:-1])
    assert prompt == full + [tokenizer.encode_special("<|assistant_start|>")]
    assert tokenizer.render_for_completion(conv[:-1]) == prompt  # ending with the user works too


@pytest.mark.parametrize("conv, message", [
    ([], "no messages"),
    ({"messages": []}, "no messages"),
    ("hello", "list of messages"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 has role 'user', expected 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "message 1 has role 'system'"),
    ([{"role": "system", "content": "only a system prompt"}], "followed by a user message"),
    ([{"role": "user", "content": ["a"]}], "message 0 .user.: content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], "unknown part type 'image'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text"}]}], "'text' string"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], "string or a list of parts"),
])
def test_malformed_conversations_raise(tokenizer, conv, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.render_conversation(conv)
    with pytest.raises(ValueError, match=message):
        tokenizer.render_for_completion(conv)


def test_render_bad_max_tokens(tokenizer):
    with pytest.raises(ValueError, match="max_tokens"):
        tokenizer.render_conversation([{"role": "user", "content": "hi"}], max_tokens=0)

# -----------------------------------------------------------------------------
# Saved format


def test_saved_in_base_dir_and_reloads(tokenizer):
    loaded = get_tokenizer()
    assert loaded.mergeable_ranks == tokenizer.mergeable_ranks
    assert loaded.special_tokens == tokenizer.special_tokens and loaded.pattern == SPLIT_PATTERN
    sample = "Round trip through the saved files, 2025 ✓"
    assert loaded.encode(sample) == tokenizer.encode(sample)
    assert not [n for n in os.listdir(get_tokenizer_dir()) if n.endswith(".tmp")]


def test_token_bytes(tokenizer):
    tb = get_token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (tokenizer.get_vocab_size(),)
    assert torch.equal(tb, tokenizer.token_bytes())
    for s in SPECIAL_TOKENS:
        assert tb[tokenizer.encode_special(s)] == 0
    for text in ["plain English text.", "naïve 日本語 😀 and <|bos|>"]:
        assert int(tb[tokenizer.encode(text)].sum()) == len(text.encode("utf-8"))


@pytest.fixture
def private_base(tmp_path, monkeypatch):
    """A base dir of this test's own, so writing into it leaves the session tokenizer alone."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    return tmp_path / "base"


def test_missing_tokenizer_names_the_commands(private_base):
    for fn in (get_tokenizer, get_token_bytes):
        with pytest.raises(FileNotFoundError, match=r"scripts\.tok_train.*scripts\.tok_import"):
            fn()
    with pytest.raises(FileNotFoundError, match="no tokenizer directory"):
        Tokenizer.from_directory(str(private_base / "nowhere"))


def test_corrupt_files_are_detected(tokenizer, tmp_path):
    d = tmp_path / "tok"
    tokenizer.save(str(d))
    pristine = {n: (d / n).read_bytes() for n in os.listdir(d)}

    def restore():
        for n, data in pristine.items():
            (d / n).write_bytes(data)

    (d / RANKS_FILE).write_bytes(pristine[RANKS_FILE][:-100])
    with pytest.raises(TokenizerError, match="sha256"):
        Tokenizer.from_directory(str(d))
    restore()
    (d / META_FILE).write_text("{not json")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        Tokenizer.from_directory(str(d))
    (d / META_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(TokenizerError, match="not a nanochat-tokenizer"):
        Tokenizer.from_directory(str(d))
    restore()
    meta = json.loads(pristine[META_FILE])
    del meta["pattern"]
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="missing field"):
        Tokenizer.from_directory(str(d))
    restore()
    os.remove(d / RANKS_FILE)
    with pytest.raises(FileNotFoundError, match="ranks.tiktoken is missing"):
        Tokenizer.from_directory(str(d))
    restore()
    assert Tokenizer.from_directory(str(d)).mergeable_ranks == tokenizer.mergeable_ranks
    with pytest.raises(TokenizerError, match="line 2"):
        parse_ranks(b"IQ== 0\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match="no tokens"):
        parse_ranks(b"\n")


def test_corrupt_token_bytes_detected(tokenizer, private_base):
    tokenizer.save(get_tokenizer_dir())
    with open(os.path.join(get_tokenizer_dir(), TOKEN_BYTES_FILE), "r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(b"\xff" * 8)
    with pytest.raises(TokenizerError, match="token_bytes.pt"):
        get_token_bytes()

# -----------------------------------------------------------------------------
# Training errors


def test_training_errors():
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train_from_iterator(iter([]), 1000)
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train_from_iterator(["", ""], 1000)
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(["some text"], 264)
    with pytest.raises(TypeError, match="item 1 is bytes"):
        Tokenizer.train_from_iterator(["ok", b"bytes"], 300)


def test_small_corpus_gives_smaller_vocab_that_still_works():
    tok = Tokenizer.train_from_iterator(["hello hello world"], 1000)
    assert 256 + len(SPECIAL_TOKENS) < tok.get_vocab_size() < 1000
    assert tok.decode(tok.encode("hello 日本 world")) == "hello 日本 world"
    assert tok.get_special_tokens() == SPECIAL_TOKENS

# -----------------------------------------------------------------------------
# External formats

SAMPLES = ["Hello world! It's 12345 o'clock.", "naïve café — 日本語のテキスト 😀👍🏽", "  indented\n\tcode(x=1)\r\n",
           "<|endoftext|> is plain text here", "I'LL   DO   it's   fine\n\n\n"]


def _check_external(tok, reference_encode=None):
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        expected = reference_encode(s) if reference_encode is not None else None
        if expected is not None:
            assert ids == expected, s
    names = tok.get_special_tokens()
    assert all(name in names for name in SPECIAL_TOKENS)
    render_ids, _ = tok.render_conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert tok.decode(render_ids) == "<|bos|><|user_start|>hi<|user_end|><|assistant_start|>yo<|assistant_end|>"


def _check_save_roundtrip(tok, tmp_path):
    tok.save(str(tmp_path / "saved"))
    again = Tokenizer.from_directory(str(tmp_path / "saved"))
    assert again.mergeable_ranks == tok.mergeable_ranks and again.special_tokens == tok.special_tokens
    assert again.pattern == tok.pattern and [again.encode(s) for s in SAMPLES] == [tok.encode(s) for s in SAMPLES]


def test_tiktoken_cl100k(tmp_path):
    path = require_shared_data("tokenizers", "tiktoken", "cl100k_base.tiktoken")
    tok = Tokenizer.from_tiktoken_file(path, pattern=GPT4_PATTERN)
    ranks = load_tiktoken_bpe(path)
    assert tok.mergeable_ranks == ranks
    reference = tiktoken.Encoding("cl100k", pat_str=GPT4_PATTERN, mergeable_ranks=ranks, special_tokens={})
    _check_external(tok, reference.encode_ordinary)
    assert tok.get_bos_token_id() == max(ranks.values()) + 1  # ours appended after the ranks
    _check_save_roundtrip(tok, tmp_path)


def test_gpt2_files_match_r50k(tmp_path):
    gpt2 = require_shared_data("tokenizers", "gpt2")
    r50k = require_shared_data("tokenizers", "tiktoken", "r50k_base.tiktoken")
    from_files = from_gpt2_files(os.path.join(gpt2, "encoder.json"), os.path.join(gpt2, "vocab.bpe"))
    from_tiktoken = Tokenizer.from_tiktoken_file(r50k, pattern=GPT2_PATTERN, special_tokens={"<|endoftext|>": 50256})
    assert from_files.mergeable_ranks == from_tiktoken.mergeable_ranks
    assert from_files.special_tokens == from_tiktoken.special_tokens
    assert from_files.encode_special("<|endoftext|>") == 50256 and from_files.get_bos_token_id() == 50257
    reference = tiktoken.Encoding("r50k", pat_str=GPT2_PATTERN, mergeable_ranks=load_tiktoken_bpe(r50k), special_tokens={})
    _check_external(from_files, reference.encode_ordinary)
    _check_save_roundtrip(from_files, tmp_path)


def _train_hf(pre_tokenizer, special_tokens=(), vocab_size=700):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from nanochat.dataset import iter_documents
    text = "\n\n".join(iter_documents(FIXTURE_TEXT, split="train", infinite=False))  # the in-repo text
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizer
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(text.split("\n\n") + SAMPLES, trainer)
    return hf


def test_hf_json_with_split_pattern(tmp_path):
    from tokenizers import Regex, pre_tokenizers
    hf = _train_hf(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                   special_tokens=["<|endoftext|>", "<|bos|>"])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = from_hf_json(str(path))
    assert tok.pattern == SPLIT_PATTERN
    assert tok.encode_special("<|endoftext|>") == 0 and tok.get_bos_token_id() == 1  # its own ids kept
    assert tok.get_vocab_size() == hf.get_vocab_size() + len(SPECIAL_TOKENS) - 1
    # HF cuts its added tokens out of any text; ours never makes special tokens from plain text
    _check_external(tok, lambda s: None if "<|" in s else hf.encode(s, add_special_tokens=False).ids)
    assert hf.encode("<|endoftext|>", add_special_tokens=False).ids == [0] and 0 not in tok.encode("<|endoftext|>")
    texts = _val_texts(30_000)
    assert tok.encode(texts) == [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    _check_save_roundtrip(tok, tmp_path)


def test_hf_json_gpt2_style_byte_level(tmp_path):
    from tokenizers import pre_tokenizers
    hf = _train_hf(pre_tokenizers.ByteLevel(add_prefix_space=False))  # its built-in GPT-2 regex
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = from_hf_json(str(path))
    assert tok.pattern == GPT2_PATTERN
    _check_external(tok, lambda s: hf.encode(s, add_special_tokens=False).ids)


def test_hf_json_that_is_not_byte_level_bpe(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers
    hf = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(["some words to learn from, and more words"], trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]"], show_progress=False))
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    with pytest.raises(TokenizerError, match="not a byte-level BPE"):
        from_hf_json(str(path))
    wp = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.save(str(path))
    with pytest.raises(TokenizerError, match="not a BPE tokenizer"):
        from_hf_json(str(path))
    path.write_text("{oops")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        from_hf_json(str(path))

# -----------------------------------------------------------------------------
# Scripts (run in-process against a private base dir)


def test_tok_import_script(tmp_path, private_base):
    from scripts import tok_import
    r50k = require_shared_data("tokenizers", "tiktoken", "r50k_base.tiktoken")
    tok_import.main([f"--tiktoken={r50k}", "--pattern=gpt2"])
    loaded = get_tokenizer()
    assert loaded.pattern == GPT2_PATTERN and loaded.get_vocab_size() == 50256 + len(SPECIAL_TOKENS)  # no <|endoftext|> given
    tok_import.main([f"--gpt2-dir={require_shared_data('tokenizers', 'gpt2')}"])
    assert get_tokenizer().encode_special("<|endoftext|>") == 50256
    with pytest.raises(SystemExit, match="not valid JSON"):
        (tmp_path / "bad.json").write_text("nope")
        tok_import.main([f"--hf-json={tmp_path / 'bad.json'}"])
    with pytest.raises(SystemExit):
        tok_import.main([])  # one source is required


def test_tok_train_and_tok_eval_scripts(private_base, capsys):
    from scripts import tok_eval, tok_train
    tiny = require_shared_data("pretrain", "tiny.txt")
    tok = tok_train.main(["--vocab-size=512", f"--data={tiny}", "--max-chars=300000", "--doc-cap=5000"])
    assert tok.get_vocab_size() == 512 and 250_000 <= tok.train_stats["chars"] < 305_000
    assert get_tokenizer().mergeable_ranks == tok.mergeable_ranks
    report = (private_base / "report" / "tokenizer-training.md").read_text()
    assert "| vocab size | 512 |" in report and "token bytes" in report

    wiki = require_shared_data("pretrain", "wikipedia")
    results = tok_eval.main([f"--data={wiki}", "--max-chars=20000", f"--ref-dir={require_shared_data('tokenizers')}"])
    assert set(results) == {"wikipedia", "news", "code", "math", "science", "french", "korean"}
    assert set(results["wikipedia"]) == {"ours", "GPT-2", "GPT-4"}
    assert 1.5 < results["wikipedia"]["ours"] < results["wikipedia"]["GPT-4"]  # 512 tokens vs 100k
    report = (private_base / "report" / "tokenizer-evaluation.md").read_text()
    assert "| wikipedia |" in report and "ours vs GPT-4" in report
    metrics = json.loads((private_base / "report" / "tokenizer-evaluation.json").read_text())["metrics"]
    assert metrics["vocab_size"] == 512 and 1.5 < metrics["chars_per_token"] < 3  # what scripts.plan reads
    capsys.readouterr()


def test_script_flag_errors(private_base, capsys):
    from scripts import tok_eval, tok_train
    for argv, flag in ([["--vocab-size=abc"], "--vocab-size"], [["--vocab-size=100"], "--vocab-size"],
                       [["--max-chars=-5"], "--max-chars"], [["--bogus=1"], "--bogus"]):
        with pytest.raises(SystemExit):
            tok_train.main(argv)
        assert flag in capsys.readouterr().err
    with pytest.raises(SystemExit, match="scripts.tok_train"):
        tok_eval.main(["--ref-dir="])  # no tokenizer in this base dir
    empty = private_base / "empty"
    empty.mkdir(parents=True)
    (empty / "a.txt").write_text("")
    with pytest.raises(SystemExit, match="error"):
        tok_train.main([f"--data={empty}", "--vocab-size=300"])


def test_bench_quick_run():
    """The benchmark's quick mode runs end to end and its checks hold (ours == rustbpe, HF == ours)."""
    require_shared_data("pretrain")
    out = subprocess.run([sys.executable, "-m", "bench.tokenizer", "--mb=1", "--heldout-mb=1", "--vocab-size=512",
                          "--encode-repeats=1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    checks = re.search(r"checks: ours == rustbpe on (\d+)/(\d+) .*, HF with our vocab == ours on (\d+)/(\d+), round trip exact: (\w+)", out.stdout)
    assert checks, out.stdout[-2000:]
    same_rb, n, same_hf, n2, roundtrip = checks.groups()
    assert same_rb == n == same_hf == n2 and int(n) > 0 and roundtrip == "True"
    assert "| ours |" in out.stdout and "| hf |" in out.stdout and "| tiktoken |" in out.stdout


def test_hf_json_consistency_checks(tmp_path):
    chars = byte_level_chars()
    base = {chars[b]: b for b in range(256)}

    def load(vocab, merges):
        cfg = {"model": {"type": "BPE", "vocab": vocab, "merges": merges}, "pre_tokenizer": {"type": "ByteLevel"},
               "decoder": {"type": "ByteLevel"}, "added_tokens": []}
        (tmp_path / "t.json").write_text(json.dumps(cfg))
        return from_hf_json(str(tmp_path / "t.json"))

    tok = load({**base, "ab": 256, "abc": 257}, [["a", "b"], ["ab", "c"]])
    assert tok.encode("abcab") == [257, 256] and tok.pattern == GPT2_PATTERN
    with pytest.raises(TokenizerError, match="do not follow merge order"):
        load({**base, "ab": 257, "bc": 256}, [["a", "b"], ["b", "c"]])
    with pytest.raises(TokenizerError, match="produced by no merge"):
        load({**base, "ab": 256, "xyz": 257}, [["a", "b"]])
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        load({**base, "ab": 256}, [["a", "b"], ["ab", "c"]])
    with pytest.raises(TokenizerError, match="256 single bytes"):
        load({k: v for k, v in base.items() if v != 7}, [])
    with pytest.raises(TokenizerError, match="outside the byte-level alphabet"):
        load({**base, "\u4e00": 256}, [])
