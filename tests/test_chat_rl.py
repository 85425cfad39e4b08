"""RL stage: the policy-gradient pieces (advantages, masks, no gradient on forced tokens) and the tiny base
model learning a toy reward on CPU, with exact resume and rank equivalence."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from nanochat import checkpoint as ck
from nanochat.chat_eval import pass_at_k
from nanochat.rl import group_advantages, policy_gradient_loss, rollout_batch, split_completion

TOY = ["--task=toy", "--source=base", "--model-tag=tiny", "--prompts-per-step=4", "--num-samples=8",
       "--device-batch-size=8", "--max-new-tokens=8", "--eval-problems=16", "--init-lr-frac=0.5"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _log(ckpt_dir):
    with open(os.path.join(ckpt_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]

# -----------------------------------------------------------------------------
# the pieces


def test_group_advantages():
    a = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert a.tolist() == [0.5, -0.5, -0.5, 0.5] and a.sum() == 0
    assert group_advantages([1.0, 1.0, 1.0]).abs().sum() == 0  # nothing to learn from a group that agrees
    n = group_advantages([3.0, 1.0, 0.0, 0.0], normalize=True)
    assert n.std().item() == pytest.approx(1.0, rel=1e-4) and n.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert pass_at_k([0, 0, 1, 0], 2) == 0 and pass_at_k([0, 0, 1, 0], 3) == 1


def test_split_completion_accepts_both_mask_layouts():
    prompt = [1, 2, 3]
    assert split_completion(prompt, [1, 2, 3, 7, 8, 9], [0, 0, 0, 1, 0, 1]) == ([7, 8, 9], [1, 0, 1])
    assert split_completion(prompt, [1, 2, 3, 7, 8, 9], [1, 0, 1]) == ([7, 8, 9], [1, 0, 1])
    assert split_completion(prompt, [1, 2, 3, 7], [1, 1, 1, 1]) == ([7], [1])  # the prompt never counts as sampled
    with pytest.raises(ValueError, match="prompt"):
        split_completion(prompt, [1, 2, 4, 7], [1])
    with pytest.raises(ValueError, match="mask"):
        split_completion(prompt, [1, 2, 3, 7, 8], [1])


def _logit_grads(model, x, y, adv):
    """Gradient of the policy-gradient loss with respect to the model's logits, per position."""
    captured = {}

    def hook(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output
    handle = model.lm_head.register_forward_hook(hook)
    try:
        loss = policy_gradient_loss(model, x, y, adv, normalizer=1.0)
        loss.backward()
    finally:
        handle.remove()
    return captured["logits"].grad.abs().sum(-1)  # (N, L)


def test_forced_tokens_never_receive_gradient(tiny_checkpoint, tokenizer):
    model, _ = ck.build_model(tiny_checkpoint[0], 40, "cpu", phase="train")
    s = tokenizer.encode_special
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "What is 6 times 7?"}]})
    call = [s("<|python_start|>")] + tokenizer.encode("6*7") + [s("<|python_end|>")]
    forced = [s("<|output_start|>")] + tokenizer.encode("42") + [s("<|output_end|>")]
    tail = tokenizer.encode("The answer is 42.")
    c1 = call + forced + tail
    m1 = [1] * len(call) + [0] * len(forced) + [1] * len(tail)
    c2 = tokenizer.encode("Forty-two.")  # shorter: the row gets padding
    m2 = [1] * len(c2)
    completions, sampled = zip(*[split_completion(prompt, prompt + c, [0] * len(prompt) + m) for c, m in ((c1, m1), (c2, m2))])
    x, y = rollout_batch(prompt, completions, sampled, pad_id=tokenizer.get_bos_token_id())
    # targets: exactly the sampled tokens
    for row, (c, m) in enumerate(zip(completions, sampled)):
        seq_mask = [0] * len(prompt) + m
        want = [t if f else -1 for t, f in zip((prompt + c)[1:], seq_mask[1:])]
        assert y[row, :len(want)].tolist() == want and (y[row, len(want):] == -1).all()
    grads = _logit_grads(model, x, y, torch.tensor([1.0, -1.0]))
    learned = y != -1
    assert (grads[~learned] == 0).all(), "prompt, forced tool output and padding positions got gradient"
    assert (grads[learned] > 0).all()
    # the forced output tokens are in the input (the model reads them) but never a target
    row0 = (prompt + c1)[1:]
    forced_positions = [i for i, f in enumerate(([0] * len(prompt) + m1)[1:]) if f == 0 and i >= len(prompt) - 1]
    assert [row0[i] for i in forced_positions] == forced and (y[0, forced_positions] == -1).all()


def test_sft_rows_give_tool_outputs_no_gradient(tiny_checkpoint, tokenizer):
    """The same guarantee for SFT: padded conversation rows carry no gradient on tool outputs or user turns."""
    from nanochat.chat_data import pad_conversations
    model, _ = ck.build_model(tiny_checkpoint[0], 40, "cpu", phase="train")
    conv = {"messages": [{"role": "user", "content": "What is 6 times 7?"},
                         {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                                           {"type": "python", "text": "6*7"},
                                                           {"type": "python_output", "text": "42"},
                                                           {"type": "text", "text": "It is 42."}]}]}
    ids, mask = tokenizer.render_conversation(conv)
    x, y = pad_conversations([(ids, mask)], tokenizer.get_bos_token_id())
    nll_grads = _logit_grads(model, x, y, torch.tensor([-1.0]))  # -1 x nll: the SFT loss
    s = tokenizer.encode_special
    out_start, out_end = ids.index(s("<|output_start|>")), ids.index(s("<|output_end|>"))
    for pos in range(out_start, out_end + 1):  # predicting any tool-output token: no gradient
        assert nll_grads[0, pos - 1] == 0
    assert (nll_grads[0][y[0] != -1] > 0).all()

# -----------------------------------------------------------------------------
# the stage


def test_toy_reward_rises(tiny_checkpoint):
    from nanochat.report import read_section_metrics
    from scripts import chat_rl
    out = chat_rl.main(TOY + ["--num-iterations=30", "--eval-every=15", "--output-tag=toy"])
    rewards = out["rewards"]
    assert len(rewards) == 30
    start, end = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert end > start + 0.1, f"mean reward went from {start:.3f} to {end:.3f}"
    for ev in (out["first_eval"], out["eval"]):  # pass@k of the first k samples: never falls as k grows
        values = [ev[f"pass@{k}"] for k in range(1, 5)]
        assert values == sorted(values) and 0 <= values[0] and values[-1] <= 1
    log = _log(out["ckpt_dir"])
    assert [r["step"] for r in log if "pass@1" in r] == [0, 15, 30]
    assert [r["step"] for r in log if "reward" in r] == list(range(1, 31))
    meta = ck.read_meta(ck.step_dir(out["ckpt_dir"], 30))
    assert meta["input"] == {"source": "base", "model_tag": "tiny", "step": 40} and meta["task"] == "toy"
    assert read_section_metrics("Chat RL")["mean_reward"] == pytest.approx(sum(rewards[-7:]) / 7)
    model, _, _ = ck.load_model("rl", "cpu", model_tag="toy")  # what chat_eval / chat_web load
    assert model.config.n_layer == 2


def test_rl_resume_matches_uninterrupted_run(tiny_checkpoint):
    import shutil
    from scripts import chat_rl
    flags = TOY + ["--num-iterations=4", "--save-every=2", "--eval-every=-1", "--eval-problems=2", "--eval-samples=2"]
    chat_rl.main(flags + ["--output-tag=rl-straight"])
    chat_rl.main(flags + ["--output-tag=rl-resumed"])
    root = ck.checkpoints_root("rl")
    straight, resumed = os.path.join(root, "rl-straight"), os.path.join(root, "rl-resumed")
    shutil.rmtree(ck.step_dir(resumed, 4))
    chat_rl.main(flags + ["--output-tag=rl-resumed", "--resume=true"])
    ra = {r["step"]: r["reward"] for r in _log(straight) if "reward" in r}
    rb = {r["step"]: r["reward"] for r in _log(resumed) if "reward" in r}
    assert sorted(rb) == [1, 2, 3, 4] and ra == rb
    a, _, _ = ck.load_checkpoint(straight, 4, "cpu")
    b, _, _ = ck.load_checkpoint(resumed, 4, "cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rl_refuses_missing_input(tiny_checkpoint):
    from scripts import chat_rl
    with pytest.raises(SystemExit, match=r"cannot load the sft model: .*(no sft checkpoint|no complete checkpoint .*sft_checkpoints/nope)"):
        chat_rl.main(["--task=toy", "--model-tag=nope"] + ["--num-iterations=1"])
    with pytest.raises(SystemExit, match="no rl checkpoint|no complete checkpoint"):
        chat_rl.main(TOY + ["--output-tag=never", "--resume=true"])
    with pytest.raises(SystemExit):
        chat_rl.get_args(["--temperature=0"])


def test_rl_two_ranks_equal_one_rank(tiny_checkpoint):
    """Each prompt's samples are seeded by its position in the run, so splitting the prompts over 2 gloo ranks
    gives the same samples, rewards and (up to float sums) the same update as one rank."""
    common = TOY + ["--num-iterations=1", "--num-samples=4", "--eval-every=-1", "--eval-problems=2", "--eval-samples=2"]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, NANOCHAT_DTYPE="fp32", OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "scripts.chat_rl", *common, "--output-tag=rl-one"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "scripts.chat_rl", *common, "--output-tag=rl-two"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "over 2 rank(s)" in two.stdout and "over 1 rank(s)" in one.stdout
    root = ck.checkpoints_root("rl")
    ra = {r["step"]: r["reward"] for r in _log(os.path.join(root, "rl-one")) if "reward" in r}
    rb = {r["step"]: r["reward"] for r in _log(os.path.join(root, "rl-two")) if "reward" in r}
    assert ra[1] == pytest.approx(rb[1], rel=1e-6)
    a, _, _ = ck.load_checkpoint(os.path.join(root, "rl-one"), 1, "cpu")
    b, _, _ = ck.load_checkpoint(os.path.join(root, "rl-two"), 1, "cpu")
    base, _, _ = ck.load_checkpoint(tiny_checkpoint[0], 40, "cpu")
    for k in a:  # Muon orthogonalizes in bf16, so float-level gradient differences move its update by ~1%
        ua, ub = a[k] - base[k], b[k] - base[k]
        assert ua.norm() > 0 and (ua - ub).norm() <= 0.03 * ua.norm(), k
