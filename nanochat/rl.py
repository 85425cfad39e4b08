"""
Policy-gradient pieces for the RL stage (scripts/chat_rl.py), GRPO-like without a KL term or ratio clipping:
on-policy, one gradient step per batch of samples.

- Sample: for each prompt, num_samples completions through the engine (tool outputs are forced into the
  stream by the engine and marked as not sampled).
- Advantages: reward minus the mean reward of the prompt's group (optionally divided by the group's std),
  so only better-than-average samples are reinforced and a group that all score the same teaches nothing.
- Loss: -sum(advantage x log p(token)) over the *sampled* completion tokens only: prompt tokens, forced
  tool outputs and padding have target -1, so they never receive gradient.
"""
import torch

from nanochat.chat_data import pad_conversations


def split_completion(prompt, result, mask):
    """(completion tokens, sampled flags) of one engine result (prompt + completion). The mask may cover
    the whole sequence or only the completion; either way the prompt never counts as sampled."""
    result, mask = list(result), list(mask)
    if result[:len(prompt)] != list(prompt):
        raise ValueError("engine result does not start with the prompt tokens")
    completion = result[len(prompt):]
    if len(mask) == len(result):
        mask = mask[len(prompt):]
    elif len(mask) != len(completion):
        raise ValueError(f"engine mask has {len(mask)} entries for a result of {len(result)} tokens "
                         f"({len(prompt)} of them prompt)")
    return completion, [int(bool(m)) for m in mask]


def group_advantages(rewards, normalize=False, eps=1e-6):
    """rewards of one prompt's samples -> reward - group mean (/ group std when normalize)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    a = r - r.mean()
    if normalize and len(rewards) > 1:
        a = a / (r.std() + eps)
    return a


def rollout_batch(prompt, completions, sampled, pad_id):
    """(inputs, targets) (N, L) int64 for N completions of one prompt: the sequence is prompt + completion,
    targets are the next tokens where that token was sampled, -1 elsewhere (prompt, forced, padding)."""
    rendered = [(list(prompt) + list(c), [0] * len(prompt) + list(m)) for c, m in zip(completions, sampled)]
    return pad_conversations(rendered, pad_id)


def policy_gradient_loss(model, inputs, targets, advantages, normalizer):
    """-(sum over sampled tokens of advantage x log p) / normalizer, for one batch of rows (advantages (N,)).
    The model returns per-token cross-entropy (= -log p, 0 where targets == -1)."""
    nll = model(inputs, targets, loss_reduction="none")  # (N, L)
    return (nll * advantages.to(nll.device, nll.dtype)[:, None]).sum() / normalizer
