"""
One torchrun rank of test_core_eval.test_distributed_two_gloo_ranks: evaluates the toy bundle
(argv[1]) with the toy model and writes what it got to <argv[2]>/rank<R>.json.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for the test module

from test_core_eval import ByteTokenizer, LastLetterModel  # noqa: E402

from nanochat.common import compute_cleanup, compute_init  # noqa: E402
from nanochat.core_eval import evaluate_core  # noqa: E402


def main():
    eval_dir, out_dir = sys.argv[1], sys.argv[2]
    _, rank, _, world_size, device = compute_init("cpu")
    model = LastLetterModel()
    out = evaluate_core(model, ByteTokenizer(), eval_dir, device=device)
    out.update(world_size=world_size, forward_calls=len(model.calls))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    compute_cleanup()


if __name__ == "__main__":
    main()
