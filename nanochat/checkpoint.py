"""
Checkpoints: one directory per step, written so that a crash at any moment never leaves something that looks complete.

    $NANOCHAT_BASE_DIR/{base,mid,sft,rl}_checkpoints/<model_tag>/step_000100/
        model.pt           weights (rank 0)
        optim_rank0.pt     optimizer state + RNG states of rank 0 (one file per rank: state is sharded)
        meta.json          model config, training metadata, file sizes and hashes; written last

All files are first written into `step_000100.partial/`; rank 0 writes meta.json and renames the directory into
place only after every rank has finished. A step directory without the `.partial` suffix and with a readable
meta.json is complete. Under several nodes the checkpoint directory must be on a filesystem every rank sees.
Loading never runs code from the files, and treats them as hostile: tensors via torch.load(weights_only=True,
mmap=True) (nothing is allocated beyond what the file holds), metadata as JSON of a bounded size, checked for its
shape and types; the model config is checked against the weight file before the model is built, weights must
be finite, and model tags are plain names inside the checkpoints folder. Every failure is a CheckpointError
naming the file and the field.
"""
import glob
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from nanochat.common import atomic_write_text, get_base_dir, is_ddp_initialized, logger, sha256_file

MAX_META_BYTES = 1 << 22  # a meta.json holds a config, some metrics and a few hashes: kilobytes
TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SOURCES = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft", "rl": "scripts.chat_rl"}
STEP_RE = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model asked for."""


def checkpoints_root(source):
    if source not in SOURCES:
        raise ValueError(f"checkpoint source must be one of {tuple(SOURCES)}, got {source!r}")
    return os.path.join(get_base_dir(), f"{source}_checkpoints")


def step_dir(ckpt_dir, step):
    return os.path.join(ckpt_dir, f"step_{step:06d}")


def _barrier():
    if is_ddp_initialized():
        dist.barrier()


def save_checkpoint(ckpt_dir, step, model_state, optimizer_state, meta, rank=0, world_size=1, rng_state=None):
    """Collective under torchrun: every rank calls it with its own optimizer state.
    `model_state` only matters on rank 0; `meta` must be JSON-serialisable."""
    final = step_dir(ckpt_dir, step)
    partial = final + ".partial"
    if rank == 0:
        os.makedirs(ckpt_dir, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that died mid-save
        os.makedirs(partial)
    _barrier()
    if optimizer_state is not None or rng_state is not None:
        torch.save({"optimizer": optimizer_state, "rng": rng_state}, os.path.join(partial, f"optim_rank{rank}.pt"))
    if rank == 0:
        torch.save(model_state, os.path.join(partial, "model.pt"))
    _barrier()
    if rank == 0:
        files = sorted(os.listdir(partial))
        meta = dict(meta, step=step, world_size=world_size,
                    files={name: {"bytes": os.path.getsize(os.path.join(partial, name)),
                                  "sha256": sha256_file(os.path.join(partial, name))} for name in files})
        atomic_write_text(os.path.join(partial, "meta.json"), json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)  # an older save of the same step
        os.replace(partial, final)
        logger.info(f"saved checkpoint {final}")
    _barrier()
    return final


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def read_meta(path):
    """meta.json of step directory `path`: a JSON object whose "files" (if any) maps plain file names to
    {"bytes": int, "sha256": str}, and whose "step" / "world_size" (if any) are counts. CheckpointError otherwise."""
    meta_path = os.path.join(path, "meta.json")
    try:
        if os.path.getsize(meta_path) > MAX_META_BYTES:
            raise CheckpointError(f"checkpoint metadata {meta_path} is over {MAX_META_BYTES} bytes: not a meta.json")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} is incomplete: meta.json is missing") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a number too long, nesting too deep
        raise CheckpointError(f"checkpoint metadata {meta_path} is corrupt: {str(e)[:200] or type(e).__name__}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata {meta_path} is corrupt: expected a JSON object, got {type(meta).__name__}")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(name, str) and name == os.path.basename(name) and name not in ("", ".", "..")
            and isinstance(info, dict) and _is_count(info.get("bytes")) and isinstance(info.get("sha256"), str)
            for name, info in files.items()):
        raise CheckpointError(f"checkpoint metadata {meta_path} is corrupt: field 'files' must map file names to "
                              '{"bytes": int, "sha256": str}')
    for field in ("step", "world_size"):
        if field in meta and not _is_count(meta[field]):
            raise CheckpointError(f"checkpoint metadata {meta_path} is corrupt: field {field!r} must be a "
                                  f"non-negative integer, got {json.dumps(meta[field])[:40]}")
    return meta


def list_complete_steps(ckpt_dir):
    metas = glob.glob(os.path.join(glob.escape(ckpt_dir), "step_*", "meta.json"))
    matches = (STEP_RE.match(os.path.basename(os.path.dirname(p))) for p in metas)
    return sorted(int(m.group(1)) for m in matches if m)


def find_last_step(ckpt_dir):
    steps = list_complete_steps(ckpt_dir)
    if not steps:
        raise CheckpointError(f"no complete checkpoint in {ckpt_dir}")
    return steps[-1]


def find_largest_model(root):
    """The model tag with the largest depth (tags look like d12, d20), else the newest directory."""
    tags = [t for t in (os.listdir(root) if os.path.isdir(root) else []) if list_complete_steps(os.path.join(root, t))]
    if not tags:
        raise CheckpointError(f"no checkpoints found in {root}")
    depth_tags = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    return max(depth_tags)[1] if depth_tags else max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t)))


def _load_tensor_file(path, expected, device):
    """torch.load of a checkpoint file whose size matches meta.json; memory-mapped, so a file cannot make us
    allocate more than it holds."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    if expected is not None and os.path.getsize(path) != expected["bytes"]:
        raise CheckpointError(f"checkpoint file {path} is truncated or altered: {os.path.getsize(path)} bytes, "
                              f"meta.json says {expected['bytes']}")
    try:
        return torch.load(path, map_location=device, weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {str(e)[:300]}") from None


def load_checkpoint(ckpt_dir, step, device, load_optimizer=False, rank=0, verify_hash=False):
    """Returns (model_state, optimizer_payload or None, meta)."""
    path = step_dir(ckpt_dir, step)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}")
    meta = read_meta(path)
    files = meta.get("files", {})
    if verify_hash:
        for name, info in files.items():
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"checkpoint file {os.path.join(path, name)} is missing")
            if sha256_file(os.path.join(path, name)) != info["sha256"]:
                raise CheckpointError(f"checkpoint file {os.path.join(path, name)} does not match its hash in meta.json")
    model_state = _load_tensor_file(os.path.join(path, "model.pt"), files.get("model.pt"), device)
    optim = None
    if load_optimizer:
        name = f"optim_rank{rank}.pt"
        if name not in files:
            raise CheckpointError(f"checkpoint {path} has no optimizer state for rank {rank} "
                                  f"(it was saved by {meta.get('world_size')} rank(s))")
        optim = _load_tensor_file(os.path.join(path, name), files.get(name), device)
    return model_state, optim, meta


def config_from_meta(meta, path):
    """The GPTConfig in meta["model_config"], every field checked (CheckpointError naming it)."""
    from nanochat.gpt import GPTConfig
    where = f"checkpoint metadata {os.path.join(path, 'meta.json')}"
    fields = meta.get("model_config")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{where}: field 'model_config' is missing or not an object")
    if unknown := sorted(set(fields) - set(GPTConfig.__dataclass_fields__)):
        raise CheckpointError(f"{where}: model_config has unknown field {unknown[0]!r}")
    try:
        return GPTConfig(**fields).validate()
    except (ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{where}: model_config: {e}") from None


def check_weights(model_state, config, path):
    """Before building the model: the weight file's tensors are the config's model (the blocks and the
    embedding it declares are in the file, so building it allocates no more than the file holds) and finite.
    Returns the state dict with torch.compile's "_orig_mod." prefix removed."""
    if not isinstance(model_state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in model_state.items()):
        raise CheckpointError(f"checkpoint file {path}/model.pt is not a state dict of named tensors")
    model_state = {k.removeprefix("_orig_mod."): v for k, v in model_state.items()}
    blocks = {int(m.group(1)) for k in model_state if (m := re.match(r"transformer\.h\.(\d{1,9})\.", k))}
    wte = model_state.get("transformer.wte.weight")
    if blocks != set(range(config.n_layer)) or wte is None or tuple(wte.shape) != (config.vocab_size, config.n_embd):
        raise CheckpointError(f"checkpoint {path}: model_config (n_layer {config.n_layer}, vocab_size {config.vocab_size}, "
                              f"n_embd {config.n_embd}) does not match model.pt ({len(blocks)} blocks, embedding "
                              f"{None if wte is None else tuple(wte.shape)})")
    for name, tensor in model_state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"checkpoint file {path}/model.pt: tensor {name} has NaN or infinite values")
    return model_state


def build_model(ckpt_dir, step, device, phase="eval"):
    """Rebuild the model from the config stored with the checkpoint and load its weights.
    Returns (model, meta)."""
    from nanochat.gpt import GPT
    path = step_dir(ckpt_dir, step)
    model_state, _, meta = load_checkpoint(ckpt_dir, step, device)
    config = config_from_meta(meta, path)
    model_state = check_weights(model_state, config, path)
    try:
        with torch.device("meta"):
            model = GPT(config)
    except (RuntimeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"checkpoint {path}: its model_config cannot be built: {str(e)[:200]}") from None
    # every tensor's shape, compared on the meta device: a config that declares more (e.g. a huge mlp_ratio) is
    # refused here, before to_empty() allocates it
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name in sorted(wanted.keys() | model_state.keys()):
        have = tuple(model_state[name].shape) if name in model_state else None
        if have != wanted.get(name):
            raise CheckpointError(f"checkpoint file {path}/model.pt does not match the model_config in meta.json: "
                                  f"{name} is {have or 'missing'} in the file, {wanted.get(name) or 'absent'} in the model")
    model.to_empty(device=device)
    model.init_weights()  # buffers such as rotary tables are not in the state dict
    model.load_state_dict(model_state, assign=True)  # keys and shapes checked above
    model.train(phase == "train")
    return model, meta


def resolve_checkpoint(source, model_tag=None, step=None):
    """(checkpoint dir, step) for a source, picking the largest model and the last step by default. A model tag
    is a plain name (letters, digits, '.', '_', '-'), so it cannot reach outside the checkpoints folder."""
    root = checkpoints_root(source)
    if model_tag is not None and (not isinstance(model_tag, str) or not TAG_RE.fullmatch(model_tag) or ".." in model_tag):
        raise CheckpointError(f"model tag {model_tag!r} is not a plain name (letters, digits, '.', '_', '-'); "
                              "for a checkpoint outside the base directory pass its folder with --checkpoint-dir")
    if step is not None and not _is_count(step):
        raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
    if not glob.glob(os.path.join(glob.escape(root), "*", "step_*", "meta.json")):
        raise CheckpointError(f"no {source} checkpoint in {root}: train one first with `python -m {SOURCES[source]}`")
    ckpt_dir = os.path.join(root, model_tag or find_largest_model(root))
    return ckpt_dir, find_last_step(ckpt_dir) if step is None else step


def load_model(source, device, phase="eval", model_tag=None, step=None, ckpt_dir=None):
    """Load a trained model and the tokenizer it was trained with. Returns (model, tokenizer, meta).
    ckpt_dir: an explicit checkpoint folder (holding step_* directories) instead of source + model_tag."""
    from nanochat.tokenizer import get_tokenizer
    if ckpt_dir is None:
        ckpt_dir, step = resolve_checkpoint(source, model_tag, step)
    elif step is None:
        step = find_last_step(ckpt_dir)
    model, meta = build_model(ckpt_dir, step, device, phase)
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != model.config.vocab_size:
        raise CheckpointError(f"the tokenizer in {get_base_dir()}/tokenizer has {tokenizer.get_vocab_size()} tokens "
                              f"but checkpoint {step_dir(ckpt_dir, step)} was trained with {model.config.vocab_size}")
    return model, tokenizer, meta
