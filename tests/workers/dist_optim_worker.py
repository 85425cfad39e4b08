"""
torchrun worker for tests/test_optim.py: trains tiny models for a few steps with the distributed
optimizers (gloo), each rank on its half of a global batch, and saves the parameters and this rank's
optimizer state so the test can compare them with single-process training on the whole batch
(the test imports CASES / make_model / make_batch / train from here for that).
Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/workers/dist_optim_worker.py OUT_DIR
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # repo root
from nanochat.gpt import GPT, GPTConfig  # noqa: E402

STEPS = 4
# vocab 64 splits evenly over 2 ranks (row-sharded AdamW); vocab 63 does not (whole-matrix owner path)
CASES = {
    "gqa_untied": GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
    "tied_oddvocab": GPTConfig(sequence_len=16, vocab_size=63, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                               tie_embeddings=True, mlp_ratio=3.0),
}
# Muon variants, all at once, set on the Muon param groups after setup_optimizers (which builds plain
# Muon) the way a schedule changes group settings; cases not named here run plain Muon
CASES["gqa_muon_variants"] = CASES["gqa_untied"]
MUON_OPTIONS = {"gqa_muon_variants": dict(ortho="polar-express", normuon_beta2=0.95, weight_decay=0.1,
                                          cautious_wd=True)}


def make_model(config):
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def make_batch(config, batch_size=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, config.vocab_size, (batch_size, config.sequence_len), generator=g)
    y = torch.randint(0, config.vocab_size, (batch_size, config.sequence_len), generator=g)
    return x, y


def train(model, batch, steps=STEPS, muon_options=None):
    opts = model.setup_optimizers(weight_decay=0.1)
    for group in opts[1].param_groups:
        group.update(muon_options or {})
    for _ in range(steps):
        model(*batch).backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    return opts


def indexed_state(opt):
    """{index of the param in the optimizer's order: its state} for params with state on this rank."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {i: dict(opt.state[p]) for i, p in enumerate(params) if opt.state[p]}


def main():
    from nanochat.common import compute_cleanup, compute_init
    from nanochat.optim import DistAdamW, DistMuon
    out_dir = sys.argv[1]
    is_ddp, rank, _, world, _ = compute_init("cpu")
    assert is_ddp and world == 2, "run under torchrun with 2 processes"
    for name, config in CASES.items():
        model = make_model(config)
        x, y = make_batch(config)
        rows = x.size(0) // world
        opts = train(model, (x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]),
                     muon_options=MUON_OPTIONS.get(name))
        assert isinstance(opts[0], DistAdamW) and isinstance(opts[1], DistMuon)
        muon_settings = [{k: v for k, v in g.items() if k != "params"} for g in opts[1].param_groups]
        torch.save(dict(params=model.state_dict(), states=[indexed_state(o) for o in opts],
                        muon_settings=muon_settings),
                   os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    compute_cleanup()


if __name__ == "__main__":
    main()
