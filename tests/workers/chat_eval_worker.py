"""
One torchrun rank of test_chat_eval.test_distributed_two_gloo_ranks: runs the chat evaluation on the
test's stand-ins and writes what it got to <argv[1]>/rank<R>.json.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for the test module

from test_chat_eval import make_fixture  # noqa: E402

from nanochat.chat_eval import run_chat_eval  # noqa: E402
from nanochat.common import compute_cleanup, compute_init  # noqa: E402


def main():
    out_dir = sys.argv[1]
    _, rank, _, world_size, device = compute_init("cpu")
    scratch = os.path.join(out_dir, f"rank{rank}")  # each rank its own data files: no write races
    os.makedirs(scratch, exist_ok=True)
    tok, model, tasks, engine = make_fixture(scratch)
    out = run_chat_eval(model, tok, engine, ["ARC-Easy", "GSM8K"], num_samples=3, tasks=tasks, device=device)
    out.update(world_size=world_size, mc_seen=tasks["ARC-Easy"].seen, gen_seeds=[c["seed"] for c in engine.calls])
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    compute_cleanup()


if __name__ == "__main__":
    main()
