"""
Our tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json) and back, for nanochat/hf.py.

tokenizer.json is a byte-level BPE that `tokenizers` (and so transformers' AutoTokenizer) runs to the same
ids as our tiktoken encoding:
- pre-split: our regex (Split, isolated), then ByteLevel without its own regex: the same pieces as tiktoken;
- model: BPE whose vocabulary is our ranks spelled in GPT-2's byte-level alphabet, and whose merges are, in
  rank order, the pair each multi-byte token is built from (bpe_merges). tiktoken merges the adjacent pair
  whose concatenation has the lowest rank; with merge priority = the rank of the merged token the two pick
  the same pair at every step. ignore_merges: a piece that is itself a token is that token, as in tiktoken;
- added tokens: our special tokens (special, no stripping), so "<|user_start|>" in text IS that token, which
  the chat template needs. Our own encode() never does that: to tokenize untrusted text as we do, call the
  HF tokenizer with split_special_tokens=True;
- post-processor: <|bos|> first, like our documents and tokenizer.encode(text, prepend=bos);
  add_special_tokens=False (as apply_chat_template does) gives exactly our encode(text).

The chat template renders our conversation format (Tokenizer._render): <|bos|>, a leading system message
joined to the first user message with a blank line, <|user_start|>...<|user_end|>, assistant turns as text
or parts (python calls and outputs between their special tokens), and <|assistant_start|> for
add_generation_prompt. Two cases differ from our token-level rendering by construction: content containing
special-token strings (the template is text, so those become special tokens), and an assistant's
consecutive text parts (we encode each part alone, the template joins them first).

Reading back goes through nanochat.tokenizer_import.from_hf_json, so the tokenizer round-trips exactly.
"""
from nanochat.tokenizer import SPECIAL_TOKENS, TokenizerError
from nanochat.tokenizer_import import byte_level_chars

BOS = "<|bos|>"


def _template():
    """The chat template (Jinja, as transformers' apply_chat_template runs it), built from one tag per line
    with no whitespace between them, so the only text it emits is the tokens and the messages."""
    lines = [
        "{%- set ns = namespace(prefix='') -%}",
        "<|bos|>",
        "{%- for message in messages -%}",
        "{%- if message['role'] == 'system' -%}",
        "{%- set ns.prefix = message['content'] + '\\n\\n' -%}",
        "{%- elif message['role'] == 'user' -%}",
        "<|user_start|>{{ ns.prefix + message['content'] }}<|user_end|>",
        "{%- set ns.prefix = '' -%}",
        "{%- else -%}",
        "<|assistant_start|>",
        "{%- if message['content'] is string -%}",
        "{{ message['content'] }}",
        "{%- else -%}",
        "{%- for part in message['content'] -%}",
        "{%- if part['type'] == 'python' -%}",
        "<|python_start|>{{ part['text'] }}<|python_end|>",
        "{%- elif part['type'] == 'python_output' -%}",
        "<|output_start|>{{ part['text'] }}<|output_end|>",
        "{%- else -%}",
        "{{ part['text'] }}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- endif -%}",
        "<|assistant_end|>",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "<|assistant_start|>",
        "{%- endif -%}",
    ]
    return "".join(lines)


CHAT_TEMPLATE = _template()


def bpe_merges(ranks):
    """[(left bytes, right bytes)] in rank order: the pair each multi-byte token is merged from, found by
    running tiktoken's rule (merge the adjacent pair of lowest rank) on the token's bytes with the tokens of
    lower rank until two parts remain. TokenizerError when a token cannot be built that way (tiktoken then
    only emits it for a piece equal to it, which no merge list can say)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                raise TokenizerError(f"token {token!r} (id {rank}) is not reachable by merges of lower-ranked tokens; "
                                     "a merge list cannot express this vocabulary")
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def tokenizer_json(tokenizer):
    """tokenizer.json's contents (a dict) for our Tokenizer; TokenizerError when it lacks our special tokens."""
    missing = [name for name in SPECIAL_TOKENS if name not in tokenizer.special_tokens]
    if missing:
        raise TokenizerError(f"the tokenizer lacks special token(s) {missing}: the chat template needs them")
    chars = byte_level_chars()
    spell = lambda b: "".join(chars[x] for x in b)  # noqa: E731
    vocab = {spell(tok): rank for tok, rank in sorted(tokenizer.mergeable_ranks.items(), key=lambda kv: kv[1])}
    bos_id = tokenizer.encode_special(BOS)
    added = [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for name, i in sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])]
    bos, a, b = ({"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [bos, a], "pair": [bos, a, bos, b],
                           "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": [[spell(a), spell(b)] for a, b in bpe_merges(tokenizer.mergeable_ranks)]},
    }


def tokenizer_config(tokenizer, model_max_length=None):
    """tokenizer_config.json's contents: the special-token roles (BOS <|bos|>, EOS <|assistant_end|>, padding
    with <|bos|>, which never needs to be learned as a label), BOS added by default, and the chat template."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": "<|assistant_end|>",
           "pad_token": BOS, "unk_token": None, "add_bos_token": True, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "split_special_tokens": False, "chat_template": CHAT_TEMPLATE}
    if model_max_length:
        cfg["model_max_length"] = model_max_length
    return cfg

