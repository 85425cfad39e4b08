"""
Train and validation bits per byte of a base checkpoint, plus a few greedy samples.

    python -m scripts.base_loss --data=../shared/data/pretrain --split-tokens=65536
    torchrun --nproc_per_node=8 -m scripts.base_loss
"""
from nanochat.checkpoint import CheckpointError, load_model
from nanochat.common import compute_cleanup, make_parser, positive_int, print0
from nanochat.dataset import DataError
from nanochat.engine import SAMPLE_PROMPTS, greedy_samples
from nanochat.training import init_device


def get_args(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--device-type", default="", choices=["", "cuda", "mps", "cpu"], help="'' = autodetect")
    p.add_argument("--data", default=None, help="data spec PATH[:WEIGHT],...; default: the downloaded reference shards")
    p.add_argument("--model-tag", default=None, help="default: the largest model")
    p.add_argument("--step", type=int, default=None, help="default: the last step")
    p.add_argument("--device-batch-size", type=positive_int, default=32)
    p.add_argument("--split-tokens", type=positive_int, default=20 * 524288, help="tokens evaluated per split")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    from nanochat.dataloader import DataLoader, build_val_loader
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes

    _, rank, world_size, device, _, autocast = init_device(args.device_type, args.seed)
    try:
        model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=args.model_tag, step=args.step)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    token_bytes = get_token_bytes(device=device)
    B, T = args.device_batch_size, model.config.sequence_len
    steps = max(1, args.split_tokens // (B * T * world_size))
    results = {}
    for split in ("train", "val"):
        try:
            loader = iter(build_val_loader(tokenizer, B, T, spec=args.data, device=device, rank=rank, world_size=world_size)
                          if split == "val" else
                          DataLoader(tokenizer, B, T, spec=args.data, split="train", device=device, seed=args.seed,
                                     rank=rank, world_size=world_size))
        except DataError as e:
            raise SystemExit(f"data error: {e}")
        with autocast():
            results[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {results[split]:.4f}")
    if rank == 0:
        with autocast():
            samples = greedy_samples(model, tokenizer, SAMPLE_PROMPTS)
        for text in samples:
            print0(f"sample: {text!r}")
        from nanochat.report import write_section
        body = (f"step {meta['step']}, {steps * B * T * world_size:,} tokens per split\n\n"
                f"| split | bpb |\n|---|---|\n| train | {results['train']:.4f} |\n| val | {results['val']:.4f} |\n\n"
                + "\n".join(f"- `{s}`" for s in samples))
        write_section("Base model loss", body, metrics={"train_bpb": results["train"], "val_bpb": results["val"]})
    compute_cleanup()
    return results


if __name__ == "__main__":
    main()
