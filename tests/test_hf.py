"""
Hugging Face interop (nanochat/hf.py, nanochat/hf_tokenizer.py, scripts/export_hf.py, scripts/import_hf.py).

The logits tests are the project's logits-parity check against an independent implementation of this
architecture: transformers' NanoChatForCausalLM, written outside this project, loaded with
AutoModelForCausalLM from our export, must give our logits (fp32, |difference| <= 1e-5 + 1e-5 * |logit|;
measured ~1e-6) for every knob combination in GRID. Tiny models with random weights (the zero-initialized
projections filled in, so every weight matters). Offline: local directories only.
"""
import json
import os
import random

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
if int(transformers.__version__.split(".")[0]) < 5:  # NanoChat and the v5 tokenizer / chat-template API
    pytest.skip(f"tests/test_hf.py needs transformers >= 5, found {transformers.__version__}", allow_module_level=True)

from conftest import FIXTURE_CHAT, FIXTURE_TEXT  # noqa: E402
from nanochat.common import read_jsonl  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.hf import HFFormatError, export, hf_config, load_dir  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

# Knob combinations (GPTConfig fields over a depth-2, 128-wide, 4-head model, context 64). Together they
# cover every knob the format maps: GQA (2 and 1 KV heads), tied embeddings, each activation, softcap on
# (two values) and off, RoPE base 1e4 / 1e5 / 5e5, MLP 4x / 3x / 2.5x and a width that rounds (96 x 2.5 -> 256).
GRID = {
    "reference": {},
    "gqa1-tied-silu-nocap-rope1e5-mlp2.5": dict(n_kv_head=1, tie_embeddings=True, activation="silu", softcap=None,
                                                rope_base=100000.0, mlp_ratio=2.5),
    "gqa2-gelu-mlp3": dict(n_kv_head=2, activation="gelu", mlp_ratio=3.0),
    "tied-relu2-cap5-rope5e5-width96": dict(n_embd=96, n_head=3, n_kv_head=3, tie_embeddings=True, softcap=5.0,
                                            rope_base=500000.0, mlp_ratio=2.5),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def random_model(vocab_size, seed=0, **knobs):
    """A tiny GPT with random weights: init_weights, then the zero-initialized matrices drawn too."""
    shape = dict(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=4, n_embd=128)
    config = GPTConfig(**{**shape, **knobs}).validate()
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="module", params=list(GRID))
def exported(request, tokenizer, tmp_path_factory):
    """(our model, the export dir, transformers' model loaded from it) for one GRID entry."""
    model = random_model(tokenizer.get_vocab_size(), **GRID[request.param])
    out = str(tmp_path_factory.mktemp(f"hf-{request.param}"))
    export(model.state_dict(), model.config, tokenizer, out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return model, out, theirs


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer, tmp_path_factory):
    """AutoTokenizer loaded from an export of the session tokenizer (the tokenizer files do not depend on the model)."""
    model = random_model(tokenizer.get_vocab_size())
    out = str(tmp_path_factory.mktemp("hf-tok"))
    export(model.state_dict(), model.config, tokenizer, out)
    return transformers.AutoTokenizer.from_pretrained(out), out

# -----------------------------------------------------------------------------
# The model: logits, config, generation, round trip


def test_logits_match_transformers_independent_implementation(exported):
    """Logits parity against transformers' own NanoChatForCausalLM (an implementation of this architecture
    written outside the project), fp32, on random token ids: |ours - theirs| <= 1e-5 + 1e-5 * |ours|."""
    model, _, theirs = exported
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, hf = model(ids), theirs(ids).logits
    assert type(theirs).__name__ == "NanoChatForCausalLM"
    assert ours.abs().max() > 1.0  # not a degenerate model whose logits all agree trivially
    torch.testing.assert_close(hf, ours, **TOL)


def test_config_json_reads_as_nanochat(exported, tokenizer):
    """AutoConfig reads config.json as NanoChat with every knob of our config."""
    model, out, _ = exported
    c, cfg = model.config, transformers.AutoConfig.from_pretrained(out)
    assert type(cfg).__name__ == "NanoChatConfig"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == \
        (c.n_embd, c.n_layer, c.n_head, c.n_kv_head)
    assert (cfg.intermediate_size, cfg.hidden_act, cfg.tie_word_embeddings) == (c.mlp_hidden_dim, c.activation, c.tie_embeddings)
    assert cfg.final_logit_softcapping == c.softcap and cfg.rope_parameters["rope_theta"] == c.rope_base
    assert (cfg.max_position_embeddings, cfg.vocab_size) == (c.sequence_len, c.vocab_size)
    assert cfg.bos_token_id == tokenizer.get_bos_token_id()
    gen = transformers.GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()]


def test_greedy_generate_matches_engine(exported, tokenizer):
    """transformers' greedy generate (its own KV cache, from apply_chat_template's ids) = our Engine's greedy
    tokens, with our stop tokens as its EOS."""
    from nanochat.engine import Engine
    model, out, theirs = exported
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.render_for_completion(conversation)
    tokens = [t for column, _ in Engine(model, tokenizer).generate(prompt, max_tokens=24, temperature=0.0)
              for t in column]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        generated = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    assert generated[0, len(prompt):].tolist() == tokens
    assert len(tokens) > 5


def test_export_import_round_trip_is_bit_exact(exported, tokenizer):
    model, out, _ = exported
    config, state, tok = load_dir(out)
    assert config.mlp_hidden_dim == model.config.mlp_hidden_dim
    assert config == GPTConfig(**{**model.config.__dict__, "mlp_ratio": config.mlp_ratio})
    ours = model.state_dict()
    assert set(state) == set(ours)
    assert all(torch.equal(state[k], ours[k]) for k in ours)
    assert (tok.mergeable_ranks, tok.special_tokens, tok.pattern) == \
        (tokenizer.mergeable_ranks, tokenizer.special_tokens, tokenizer.pattern)


def test_bf16_export_imports_exactly(tokenizer, tmp_path):
    """A bf16 export stores bf16 and imports as fp32 holding exactly the bf16 values."""
    model = random_model(tokenizer.get_vocab_size())
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    export(state, model.config, tokenizer, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, back, _ = load_dir(str(tmp_path))
    assert all(back[k].dtype == torch.float32 and torch.equal(back[k], state[k].float()) for k in state)

# -----------------------------------------------------------------------------
# The tokenizer and the chat template


def held_out_documents():
    with open(os.path.join(FIXTURE_TEXT, "val.txt"), encoding="utf-8") as f:
        return [d for d in f.read().split("\n\n") if d.strip()]


def test_autotokenizer_ids_equal_ours_on_held_out_english(hf_tokenizer, tokenizer):
    """Held-out fixture text (not seen in tokenizer training): plain ids equal, BOS prepended by default
    (like our documents), and decode gives the text back."""
    tok, out = hf_tokenizer
    from tokenizers import Tokenizer as RawTokenizer
    raw = RawTokenizer.from_file(os.path.join(out, "tokenizer.json"))
    docs = held_out_documents()
    assert len(docs) > 5
    for doc in docs:
        ours = tokenizer.encode(doc)
        assert tok(doc, add_special_tokens=False)["input_ids"] == ours
        assert tok(doc)["input_ids"] == [tokenizer.get_bos_token_id()] + ours
        assert raw.encode(doc, add_special_tokens=False).ids == ours
        assert tok.decode(ours) == doc


def random_unicode(rng, n):
    """Characters from everywhere: ASCII, Latin-1 and other two-byte letters, CJK and other BMP planes,
    astral characters (emoji), and the whitespace and digits the split pattern treats specially."""
    pools = [lambda: rng.randrange(32, 127), lambda: rng.randrange(0xA0, 0x800), lambda: rng.randrange(0x800, 0xD800),
             lambda: rng.randrange(0xE000, 0x110000), lambda: rng.choice([9, 10, 13, 32, 0x85, 0xA0, 0x2028, 0x3000]),
             lambda: rng.choice(b"0123456789'sdmtlrve ")]
    return "".join(chr(rng.choice(pools)()) for _ in range(n))


def test_autotokenizer_ids_equal_ours_on_random_unicode(hf_tokenizer, tokenizer):
    tok, _ = hf_tokenizer
    rng = random.Random(0)
    for _ in range(300):
        text = random_unicode(rng, rng.randrange(1, 60))
        ours = tokenizer.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ours, repr(text)
        assert tok.decode(ours) == tokenizer.decode(ours)


def test_special_token_strings_in_text(hf_tokenizer, tokenizer):
    """Our encode() keeps special-token strings as text; the HF tokenizer does the same with
    split_special_tokens=True. By default (what chat templates need) such a string IS the special token."""
    tok, _ = hf_tokenizer
    rng = random.Random(1)
    for _ in range(50):
        pieces = [random_unicode(rng, rng.randrange(0, 8)) for _ in range(4)]
        text = "".join(p + rng.choice(SPECIAL_TOKENS) for p in pieces)
        assert tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == tokenizer.encode(text)
    text = "say <|assistant_end|> now"
    assert tok(text, add_special_tokens=False)["input_ids"] == \
        tokenizer.encode("say ") + [tokenizer.encode_special("<|assistant_end|>")] + tokenizer.encode(" now")


def test_cl100k_exports_to_the_same_ids(tmp_path):
    """A tokenizer trained elsewhere (OpenAI's cl100k_base, 100k merges, GPT-4's split pattern), as tok_import
    would bring it in: the tokenizers library reads our tokenizer.json to the same ids, and it reads back exactly."""
    from tokenizers import Tokenizer as RawTokenizer

    from conftest import require_shared_data
    from nanochat.hf_tokenizer import tokenizer_json
    from nanochat.tokenizer import PATTERNS
    from nanochat.tokenizer_import import from_hf_json
    tok = Tokenizer.from_tiktoken_file(require_shared_data("tokenizers", "tiktoken", "cl100k_base.tiktoken"),
                                       pattern=PATTERNS["gpt4"])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tokenizer_json(tok), ensure_ascii=False), encoding="utf-8")
    raw = RawTokenizer.from_file(str(path))
    rng = random.Random(2)
    for text in held_out_documents() + [random_unicode(rng, rng.randrange(1, 60)) for _ in range(300)]:
        assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text), repr(text)
    back = from_hf_json(str(path))
    assert (back.mergeable_ranks, back.special_tokens, back.pattern) == (tok.mergeable_ranks, tok.special_tokens, tok.pattern)


def chat_fixture_conversations():
    return [row for name in ("questions.jsonl", "tasks.jsonl") for row in read_jsonl(os.path.join(FIXTURE_CHAT, name))]


def test_chat_template_with_generation_prompt_equals_render_for_completion(hf_tokenizer, tokenizer):
    """Every fixture conversation (system prompts, multi-turn, tool calls and outputs) without its final answer:
    apply_chat_template(add_generation_prompt=True) = render_for_completion; the whole conversation without the
    prompt = render_conversation."""
    tok, _ = hf_tokenizer
    conversations = chat_fixture_conversations()
    assert any(c["messages"][0]["role"] == "system" for c in conversations)
    assert any(isinstance(m["content"], list) for c in conversations for m in c["messages"])
    for conv in conversations:
        messages = conv["messages"]
        prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
        assert prompt == tokenizer.render_for_completion(messages[:-1])
        assert prompt == tokenizer.render_for_completion(messages)  # which drops the final answer itself
        full = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
        assert full == tokenizer.render_conversation(messages, max_tokens=10**6)[0]

# -----------------------------------------------------------------------------
# What the format cannot express, and broken directories


def test_export_refuses_a_knob_without_counterpart(tokenizer):
    import dataclasses

    @dataclasses.dataclass
    class WithExtraKnob(GPTConfig):
        extra_knob: bool = False

    V = tokenizer.get_vocab_size()
    with pytest.raises(HFFormatError, match="GPTConfig.extra_knob=True has no counterpart"):
        hf_config(WithExtraKnob(vocab_size=V, extra_knob=True), tokenizer, torch.float32)
    assert "extra_knob" not in hf_config(WithExtraKnob(vocab_size=V), tokenizer, torch.float32)  # at its default: the model is NanoChat's
    for knob in (dict(residual_scalars=True), dict(value_embeds=True), dict(window_pattern="SSSL")):
        name = next(iter(knob))
        with pytest.raises(HFFormatError, match=f"GPTConfig.{name}=.* has no counterpart.*--{name.replace('_', '-')}"):
            hf_config(GPTConfig(vocab_size=V, **knob), tokenizer, torch.float32)
    with pytest.raises(HFFormatError, match="GPTConfig.activation='swiglu'"):
        hf_config(GPTConfig(vocab_size=tokenizer.get_vocab_size(), activation="swiglu"), tokenizer, torch.float32)
    with pytest.raises(HFFormatError, match="tokenizer has 4096 tokens, the model 5000"):
        hf_config(GPTConfig(vocab_size=5000), tokenizer, torch.float32)


def test_export_refuses_a_tokenizer_without_our_special_tokens(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    tok = Tokenizer(ranks, {"<|endoftext|>": 256})
    model = random_model(257)
    with pytest.raises(TokenizerError, match="lacks special token"):
        export(model.state_dict(), model.config, tok, str(tmp_path))


@pytest.fixture
def export_dir(tokenizer, tmp_path):
    model = random_model(tokenizer.get_vocab_size(), n_kv_head=2)
    export(model.state_dict(), model.config, tokenizer, str(tmp_path))
    return tmp_path


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_import_names_a_missing_file(export_dir, name):
    os.remove(export_dir / name)
    with pytest.raises(HFFormatError, match=rf"{export_dir / name} is missing"):
        load_dir(str(export_dir))


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="llama"), "config.json: model_type is 'llama', expected 'nanochat'"),
    (dict(num_key_value_heads=4), r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(64, 128\)"),
    (dict(intermediate_size=500), "config.json: intermediate_size 500 is not a multiple of 64"),
    (dict(hidden_act="gelu_pytorch_tanh"), "config.json: hidden_act 'gelu_pytorch_tanh' is not one of ours"),
    (dict(attention_bias=True), "config.json: attention_bias is true"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "only rope_type 'default'"),
    (dict(rms_norm_eps=1e-3), "config.json: rms_norm_eps 0.001 is above"),
    (dict(hidden_size="128"), "config.json: field 'hidden_size' must be a positive int"),
    (dict(vocab_size=5000), "tokenizer.json has 4096 tokens but .*config.json says vocab_size 5000"),
    (dict(tie_word_embeddings=True), "model.safetensors: tie_word_embeddings is true but lm_head.weight differs"),
])
def test_import_names_the_file_and_field_that_do_not_fit(export_dir, changes, message):
    edit_config(export_dir, **changes)
    with pytest.raises(HFFormatError, match=message):
        load_dir(str(export_dir))


def test_import_names_a_missing_or_extra_tensor_and_bad_files(export_dir):
    from safetensors.torch import load_file, save_file
    weights = export_dir / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "model.layers.1.mlp.fc2.weight"}, weights)
    with pytest.raises(HFFormatError, match=r"model.safetensors: tensor 'model.layers.1.mlp.fc2.weight' is missing"):
        load_dir(str(export_dir))
    save_file({**tensors, "model.layers.2.mlp.fc1.weight": tensors["model.layers.1.mlp.fc1.weight"].clone()}, weights)
    with pytest.raises(HFFormatError, match=r"unexpected tensor\(s\) \['model.layers.2.mlp.fc1.weight'\]"):
        load_dir(str(export_dir))
    weights.write_bytes(b"not safetensors")
    with pytest.raises(HFFormatError, match="model.safetensors: not a readable safetensors file"):
        load_dir(str(export_dir))
    (export_dir / "config.json").write_text("{ not json")
    with pytest.raises(HFFormatError, match="config.json: not valid JSON"):
        load_dir(str(export_dir))


def test_import_reads_a_sharded_export(export_dir):
    """save_pretrained's sharded layout: model.safetensors.index.json and the shards it lists."""
    from safetensors.torch import load_file, save_file
    expected = load_dir(str(export_dir))[1]
    tensors = load_file(export_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, export_dir / shard)
    (export_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    os.remove(export_dir / "model.safetensors")
    state = load_dir(str(export_dir))[1]
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    os.remove(export_dir / "model-00002-of-00002.safetensors")
    with pytest.raises(HFFormatError, match="model-00002-of-00002.safetensors is missing"):
        load_dir(str(export_dir))

# -----------------------------------------------------------------------------
# The scripts, end to end on the session's trained tiny checkpoint


def test_export_script_then_import_script_round_trip(tiny_checkpoint, tokenizer, tmp_path, monkeypatch):
    """export_hf from a tiny base checkpoint trained without value embeddings (with --verify against transformers),
    the report card section, greedy generation of the trained model in transformers vs our engine, then import_hf
    into a fresh base dir: the imported checkpoint loads with load_model and holds exactly the original weights.
    The default tiny checkpoint has value embeddings, which transformers' NanoChat lacks: refused, naming the flag."""
    from conftest import FIXTURE_TEXT, TINY_TRAIN_FLAGS
    from nanochat.checkpoint import load_model
    from nanochat.engine import Engine
    from nanochat.report import get_report_dir
    from scripts import base_train, export_hf, import_hf
    with pytest.raises(SystemExit, match="value_embeds=True has no counterpart.*--value-embeds"):
        export_hf.main(["-i", "base", "-g", "tiny", "--out", str(tmp_path / "refused")])
    base_train.main(TINY_TRAIN_FLAGS + [f"--data={FIXTURE_TEXT}", "--model-tag=tiny-hf", "--value-embeds=false"])
    out = tmp_path / "export"
    result = export_hf.main(["-i", "base", "-g", "tiny-hf", "--out", str(out), "--verify"])
    assert result["verify_error"] < 1e-5 and result["step"] == 40
    assert str(out) in (open(os.path.join(get_report_dir(), "hugging-face-export.md")).read())
    original, _, _ = load_model("base", "cpu", model_tag="tiny-hf")

    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    prompt = hf_tok("The capital of France is")["input_ids"]
    assert prompt == tokenizer.encode("The capital of France is", prepend="<|bos|>")
    ours = [t for column, _ in Engine(original, tokenizer).generate(prompt, max_tokens=16, temperature=0.0) for t in column]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        generated = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert generated[0, len(prompt):].tolist() == ours

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    imported = import_hf.main([str(out), "--as", "base"])
    assert imported["model_tag"] == "d2" and imported["tokenizer_written"]
    model, tok, _ = load_model("base", "cpu", model_tag="d2")
    assert model.config == original.config
    a, b = model.state_dict(), original.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert tok.mergeable_ranks == tokenizer.mergeable_ranks and tok.special_tokens == tokenizer.special_tokens

    # a second import of the same tag is refused; under another tag the same tokenizer is kept as it is
    with pytest.raises(SystemExit, match="already holds checkpoints; choose another --model-tag"):
        import_hf.main([str(out), "--as", "base"])
    assert not import_hf.main([str(out), "--as", "sft", "--model-tag", "tiny"])["tokenizer_written"]


def test_import_script_keeps_a_different_tokenizer_unless_told(export_dir, tmp_path, monkeypatch):
    from nanochat.tokenizer import get_tokenizer, get_tokenizer_dir
    from scripts import import_hf
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    other = Tokenizer.train_from_iterator(["a small different corpus " * 20], 300)
    other.save(get_tokenizer_dir())
    with pytest.raises(SystemExit, match="holds a different tokenizer .*--replace-tokenizer"):
        import_hf.main([str(export_dir)])
    assert get_tokenizer().get_vocab_size() == other.get_vocab_size()
    assert import_hf.main([str(export_dir), "--replace-tokenizer"])["tokenizer_written"]
    assert get_tokenizer().get_vocab_size() == 4096


def test_scripts_fail_with_a_message(tmp_path, monkeypatch, capsys):
    from scripts import export_hf, import_hf
    with pytest.raises(SystemExit, match=f"import_hf: cannot import {tmp_path}: .*config.json is missing"):
        import_hf.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="must be a plain name"):
        import_hf.main([str(tmp_path), "--model-tag", "../escape"])
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "empty"))
    with pytest.raises(SystemExit):
        export_hf.main(["-i", "rl", "--out", str(tmp_path / "out")])
    assert "export_hf: no rl checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")
