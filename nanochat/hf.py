"""
Hugging Face interop: our model + tokenizer <-> a directory that transformers loads as NanoChat
(`AutoConfig` -> NanoChatConfig, `AutoModelForCausalLM` -> NanoChatForCausalLM, `AutoTokenizer` -> a fast
tokenizer), and back. The directory:

    config.json             NanoChatConfig (model_type "nanochat"): every GPTConfig field mapped (CONFIG_FIELDS)
    generation_config.json  BOS, the stop tokens as EOS, the chat server's sampling defaults
    model.safetensors       the weights under transformers' names (expected_names), in the checkpoint's dtype
    tokenizer.json          byte-level BPE with our split pattern and special tokens (nanochat/hf_tokenizer.py)
    tokenizer_config.json   the special-token roles and a chat template that renders our conversation format

Why the mapping is exact: NanoChatForCausalLM is this architecture (parameter-free RMSNorm after the
embedding, before attention, MLP and head; QK norm; rotary with the same pairing (i, i + D/2) and the same
frequencies base ** (-2i / D); plain MLP fc1 -> activation -> fc2; softcap c * tanh(logits / c)). What
differs is names and two fixed details: its RMSNorm eps is a config value where ours is the dtype's machine
epsilon (we export float32's), and its embedding takes a padding_idx (we export pad_token_id None, so every
row trains). tests/test_hf.py checks the logits against transformers' own implementation.

Reading never runs code from the files: JSON, and tensors through safetensors.
"""
import json
import os
from dataclasses import fields

import torch

from nanochat.common import atomic_write_text, logger
from nanochat.gpt import GPT, GPTConfig
from nanochat.hf_tokenizer import tokenizer_config, tokenizer_json
from nanochat.tokenizer import TokenizerError
from nanochat.tokenizer_import import from_hf_json

CONFIG_FILE, GENERATION_FILE, WEIGHTS_FILE, INDEX_FILE = ("config.json", "generation_config.json", "model.safetensors",
                                                         "model.safetensors.index.json")
TOKENIZER_FILE, TOKENIZER_CONFIG_FILE = "tokenizer.json", "tokenizer_config.json"
MODEL_TYPE, ARCHITECTURE = "nanochat", "NanoChatForCausalLM"
RMS_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm(eps=None) uses the input dtype's machine epsilon
MAX_RMS_NORM_EPS = 1e-5  # transformers' default is 1e-6; a larger eps changes the function visibly: refused on import
# GPTConfig field -> NanoChatConfig field. GPTConfig fields not listed here (the 2026 recipe's residual scalars, value
# embeddings, sliding windows) have no counterpart: export refuses a model that sets them away from their default.
CONFIG_FIELDS = {"sequence_len": "max_position_embeddings", "vocab_size": "vocab_size", "n_layer": "num_hidden_layers",
                 "n_head": "num_attention_heads", "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size",
                 "mlp_ratio": "intermediate_size", "activation": "hidden_act", "tie_embeddings": "tie_word_embeddings",
                 "softcap": "final_logit_softcapping", "rope_base": "rope_parameters"}
# our activation -> transformers' ACT2FN name of the same function (F.gelu is the exact, erf one: "gelu")
ACTIVATIONS = {"relu2": "relu2", "gelu": "gelu", "silu": "silu"}


class HFFormatError(ValueError):
    """A model that the NanoChat format cannot express, or a directory that is not a usable NanoChat export;
    the message names the knob or the file and field."""

# -----------------------------------------------------------------------------
# Weight names. Ours (nanochat/gpt.py) -> transformers' (modeling_nanochat.py); the matrices are the same
# (nn.Linear weights, out x in), so only the names change.

LAYER_NAMES = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
               "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def expected_names(config):
    """{our state_dict name: transformers' name} for `config`; tied embeddings store the matrix once
    (transformers ties lm_head.weight to model.embed_tokens.weight when tie_word_embeddings is set)."""
    names = {"transformer.wte.weight": "model.embed_tokens.weight"}
    for i in range(config.n_layer):
        for ours, theirs in LAYER_NAMES.items():
            names[f"transformer.h.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def to_hf_state(state, config, dtype=None):
    """Our state_dict (a checkpoint's, "_orig_mod." prefixes allowed) -> transformers' names, contiguous
    tensors in `dtype` (None: as stored). HFFormatError when a tensor is missing or unexpected."""
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    names = expected_names(config)
    missing, extra = sorted(set(names) - set(state)), sorted(set(state) - set(names))
    if missing or extra:
        raise HFFormatError(f"the model's weights do not fit its config: missing {missing[:3]}, unexpected {extra[:3]}")
    return {theirs: state[ours].detach().to("cpu", dtype or state[ours].dtype).contiguous()
            for ours, theirs in names.items()}


def from_hf_state(tensors, config, source):
    """transformers' tensors -> our state_dict, checked against `config` by name and shape; fp32 (bf16 and
    fp16 convert exactly). HFFormatError naming `source` and the tensor otherwise. A tied export that also
    stores lm_head.weight is accepted when it equals the embedding."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    names = expected_names(config)
    state = {}
    for ours, theirs in names.items():
        if theirs not in tensors:
            raise HFFormatError(f"{source}: tensor {theirs!r} is missing")
        t = tensors[theirs]
        if tuple(t.shape) != shapes[ours]:
            raise HFFormatError(f"{source}: tensor {theirs!r} has shape {tuple(t.shape)}, config.json implies {shapes[ours]}")
        if not t.is_floating_point():
            raise HFFormatError(f"{source}: tensor {theirs!r} has dtype {t.dtype}, expected a floating-point dtype")
        state[ours] = t.float()
    extra = sorted(set(tensors) - set(names.values()))
    if config.tie_embeddings and "lm_head.weight" in extra:
        if not torch.equal(tensors["lm_head.weight"].float(), state["transformer.wte.weight"]):
            raise HFFormatError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                                "model.embed_tokens.weight")
        extra.remove("lm_head.weight")
    if extra:
        raise HFFormatError(f"{source}: unexpected tensor(s) {extra[:3]} (not in a NanoChat model of this config)")
    return state

# -----------------------------------------------------------------------------
# config.json


def _dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def hf_config(config, tokenizer, dtype):
    """config.json's contents for GPTConfig `config`. HFFormatError naming the knob the format cannot express.
    tokenizer None (a benchmark's random model): no BOS / EOS ids."""
    unmapped = [f for f in fields(config) if f.name not in CONFIG_FIELDS and getattr(config, f.name) != f.default]
    if unmapped:
        name, default = unmapped[0].name, unmapped[0].default
        default = str(default).lower() if isinstance(default, bool) else default
        raise HFFormatError(f"GPTConfig.{name}={getattr(config, name)!r} has no counterpart in transformers' "
                            f"NanoChatConfig: this model cannot be exported in the NanoChat format (train with "
                            f"--{name.replace('_', '-')}={default} to export)")
    if config.activation not in ACTIVATIONS:
        raise HFFormatError(f"GPTConfig.activation={config.activation!r} has no transformers activation "
                            f"(mapped: {sorted(ACTIVATIONS)})")
    if tokenizer is not None and tokenizer.get_vocab_size() != config.vocab_size:
        raise HFFormatError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens, the model {config.vocab_size}")
    special = tokenizer.encode_special if tokenizer is not None else lambda name: None
    return {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "dtype": _dtype_name(dtype),
        "vocab_size": config.vocab_size, "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head,
        "intermediate_size": config.mlp_hidden_dim, "hidden_act": ACTIVATIONS[config.activation],
        "max_position_embeddings": config.sequence_len, "tie_word_embeddings": config.tie_embeddings,
        "final_logit_softcapping": float(config.softcap) if config.softcap else None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(config.rope_base)},
        "rms_norm_eps": RMS_NORM_EPS, "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": special("<|bos|>"), "eos_token_id": special("<|assistant_end|>"), "pad_token_id": None,
        "use_cache": True,
    }


def _number(cfg, key, kind, source):
    """cfg[key] when it is a positive `kind` (int, or (int, float)); HFFormatError naming the field otherwise."""
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "int" if kind is int else "number"
        raise HFFormatError(f"{source}: field {key!r} must be a positive {what}, got {value!r}")
    return value


def gpt_config_from_hf(cfg, source):
    """The GPTConfig a NanoChat config.json (parsed) describes. HFFormatError naming `source` and the field when
    it is not NanoChat or sets something our model cannot do (biases, another RoPE type, an unknown activation,
    an MLP width that is no multiple of 64, a head_dim other than hidden_size / heads)."""
    if not isinstance(cfg, dict) or cfg.get("model_type") != MODEL_TYPE:
        raise HFFormatError(f"{source}: model_type is {cfg.get('model_type') if isinstance(cfg, dict) else None!r}, "
                            f"expected {MODEL_TYPE!r} (a transformers NanoChat model)")
    n_embd, n_head = _number(cfg, "hidden_size", int, source), _number(cfg, "num_attention_heads", int, source)
    n_kv_head = n_head if cfg.get("num_key_value_heads") is None else _number(cfg, "num_key_value_heads", int, source)
    hidden = _number(cfg, "intermediate_size", int, source)
    act = cfg.get("hidden_act", "relu2")
    ours = {v: k for k, v in ACTIVATIONS.items()}
    if act not in ours:
        raise HFFormatError(f"{source}: hidden_act {act!r} is not one of ours {sorted(ours)}")
    if cfg.get("attention_bias"):
        raise HFFormatError(f"{source}: attention_bias is true; our attention has no biases")
    if cfg.get("head_dim") not in (None, n_embd // n_head) or n_embd % n_head:
        raise HFFormatError(f"{source}: head_dim must be hidden_size / num_attention_heads ({n_embd} / {n_head})")
    eps = cfg.get("rms_norm_eps", 1e-6)
    if not isinstance(eps, (int, float)) or not 0 <= eps <= MAX_RMS_NORM_EPS:
        raise HFFormatError(f"{source}: rms_norm_eps {eps!r} is above {MAX_RMS_NORM_EPS}; ours is fixed at the dtype's "
                            "machine epsilon")
    rope = cfg.get("rope_parameters") or {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise HFFormatError(f"{source}: rope_parameters {rope!r}: only rope_type 'default' (plain RoPE) is supported")
    softcap = cfg.get("final_logit_softcapping")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap < 0):
        raise HFFormatError(f"{source}: final_logit_softcapping must be a non-negative number or null, got {softcap!r}")
    # mlp_ratio round-trips through GPTConfig.mlp_hidden_dim's rounding to a multiple of 64
    config = GPTConfig(sequence_len=_number(cfg, "max_position_embeddings", int, source),
                       vocab_size=_number(cfg, "vocab_size", int, source),
                       n_layer=_number(cfg, "num_hidden_layers", int, source), n_head=n_head, n_kv_head=n_kv_head,
                       n_embd=n_embd, mlp_ratio=hidden / n_embd, activation=ours[act],
                       tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), softcap=softcap or None,
                       rope_base=float(_number(rope, "rope_theta", (int, float), source)))
    if config.mlp_hidden_dim != hidden:
        raise HFFormatError(f"{source}: intermediate_size {hidden} is not a multiple of 64 (our MLP width rule)")
    try:
        return config.validate()
    except ValueError as e:
        raise HFFormatError(f"{source}: {e}") from None


def generation_config(tokenizer, temperature, top_k, max_new_tokens):
    """generation_config.json: our engine stops at <|assistant_end|> or <|bos|>, so both are EOS; sampling
    defaults are the chat server's."""
    special = tokenizer.encode_special
    return {"bos_token_id": special("<|bos|>"), "eos_token_id": [special("<|assistant_end|>"), special("<|bos|>")],
            "pad_token_id": special("<|bos|>"), "do_sample": temperature > 0, "temperature": temperature,
            "top_k": top_k, "max_new_tokens": max_new_tokens}

# -----------------------------------------------------------------------------
# The directory


def export(state, config, tokenizer, out_dir, dtype=None):
    """Write the NanoChat directory `out_dir` (made if missing; other files in it are left alone) for our
    model state, GPTConfig and Tokenizer. Each file is written to a temp name and renamed (never a partial
    file), config.json last. dtype: the weights' dtype (None: as stored). Returns {file name: bytes}."""
    from safetensors.torch import save_file

    from nanochat.serve import ServeConfig
    # every file's contents first: a tokenizer without our special tokens, or a knob the format cannot
    # express, fails before anything is written
    serve = ServeConfig()
    files = {TOKENIZER_FILE: tokenizer_json(tokenizer),
             TOKENIZER_CONFIG_FILE: tokenizer_config(tokenizer, config.sequence_len),
             GENERATION_FILE: generation_config(tokenizer, serve.temperature, serve.top_k, serve.max_tokens)}
    cfg = hf_config(config, tokenizer, dtype)  # refuses a config the format cannot express, naming the flag
    tensors = to_hf_state(state, config, dtype)
    cfg["dtype"] = _dtype_name(next(iter(tensors.values())).dtype)  # dtype None: as stored, known only now
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{WEIGHTS_FILE}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    for name, content in [*files.items(), (CONFIG_FILE, cfg)]:
        atomic_write_text(os.path.join(out_dir, name), json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    logger.info(f"exported NanoChat model to {out_dir}")
    return {name: os.path.getsize(os.path.join(out_dir, name)) for name in [WEIGHTS_FILE, *files, CONFIG_FILE]}


def _read_json(path):
    if not os.path.exists(path):
        raise HFFormatError(f"{path} is missing (a NanoChat directory has {CONFIG_FILE}, {WEIGHTS_FILE} and "
                            f"{TOKENIZER_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{path}: not valid JSON ({e})") from None


def _read_tensors(path):
    """{name: tensor} of model.safetensors, or of the shards a model.safetensors.index.json lists."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    single, index = os.path.join(path, WEIGHTS_FILE), os.path.join(path, INDEX_FILE)
    if os.path.exists(single):
        shards = [single]
    elif os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise HFFormatError(f"{index}: no 'weight_map' object")
        shards = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    else:
        raise HFFormatError(f"{single} is missing (nor is there a sharded {INDEX_FILE})")
    tensors = {}
    for shard in shards:
        if not os.path.exists(shard):
            raise HFFormatError(f"{shard} is missing ({INDEX_FILE} lists it)")
        try:
            tensors.update(load_file(shard))
        except (SafetensorError, OSError, ValueError) as e:
            raise HFFormatError(f"{shard}: not a readable safetensors file ({e})") from None
    return tensors


def load_dir(path):
    """(GPTConfig, our state_dict in fp32, Tokenizer) from a NanoChat directory. HFFormatError naming the file
    (and field or tensor) when one is missing, unreadable, or does not fit the others."""
    if not os.path.isdir(path):
        raise HFFormatError(f"{path} is not a directory")
    config_path = os.path.join(path, CONFIG_FILE)
    config = gpt_config_from_hf(_read_json(config_path), config_path)
    tok_path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.exists(tok_path):
        raise HFFormatError(f"{tok_path} is missing")
    try:
        tokenizer = from_hf_json(tok_path)
    except TokenizerError as e:
        raise HFFormatError(str(e)) from None
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise HFFormatError(f"{tok_path} has {tokenizer.get_vocab_size()} tokens but {config_path} says vocab_size "
                            f"{config.vocab_size}")
    state = from_hf_state(_read_tensors(path), config, os.path.join(path, WEIGHTS_FILE))
    return config, state, tokenizer

