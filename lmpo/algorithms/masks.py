"""Masks and weights that decide which samples or tokens train: DeepSeek-V3.2's off-policy
sequence mask, truncated importance sampling, DAPO's zero-variance groups and overlong
penalty, and the kept sampling support."""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import as_bool, check_groups, clean, per_token, row_mean

__all__ = [
    "off_policy_sequence_mask",
    "truncated_is_weights",
    "zero_std_groups",
    "overlong_penalty",
    "sampling_support_logp",
]


@torch.no_grad()
def off_policy_sequence_mask(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                             delta: float) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask M, float [N, T] (1 = keep, 0 at masked positions).

    M_it = 0  <=>  A_it < 0  and  (1/|o_i|) sum_t (old_logp_it - logp_it) > delta,
    where old_logp is the sampling policy's log-prob and logp the current policy's.

    Paper: DeepSeek-AI 2025, "DeepSeek-V3.2" (off-policy sequence masking). It differs from
    PPO clipping in acting on the negative-advantage tokens of a whole sequence whose mean
    log-ratio (a KL estimate) says it drifted too far, rather than on single tokens: the
    divergence is decided per sequence (one very off-policy token in an otherwise close
    sequence does not drop it), the sign per token, as in the paper's M_{i,t} (it matters for
    per-token advantages: GAE, REINFORCE++, process supervision, whitening). advantages [N]
    (one sign per row) or [N, T]. M multiplies the clipped policy term only: the KL term stays.
    No gradient.
    """
    m = as_bool(mask)
    kl = row_mean(old_logp - logp, m)  # [N]
    adv = per_token(advantages, m)  # [N, T]
    drop = (adv < 0) & (kl > delta)[:, None]  # [N, T]
    return (m & ~drop).to(kl.dtype)


@torch.no_grad()
def truncated_is_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance-sampling weights for the trainer / inference-engine mismatch.
    # [N, T], detached

    w_t = min(exp(old_logp_t - sampler_logp_t), cap); 0 at masked positions.

    Paper: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training" (TIS). It differs from the PPO ratio in correcting for the gap between the
    engine that sampled (e.g. vLLM) and the trainer's own old policy, truncated at `cap` to
    bound the variance. Multiply the per-token policy loss by w.
    """
    m = as_bool(mask)
    w = torch.exp(clean(old_logp - sampler_logp, m)).clamp(max=cap)
    return clean(w, m)


@torch.no_grad()
def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """bool [num_groups]: groups whose rewards are all equal (zero advantage, no signal).

    Paper: Yu et al. 2025, "DAPO" (dynamic sampling drops these groups and samples more).
    """
    g = rewards.view(check_groups(rewards.shape[0], group_size), group_size)  # [B, G]
    return (g == g[:, :1]).all(-1)


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, penalty: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, [N], added to the reward.

    With L_exp = max_len - buffer:
      0                                   if L <= L_exp
      (L_exp - L) / buffer * penalty      if L_exp < L <= max_len   (linear from 0 to -penalty)
      -penalty                            if L > max_len

    Paper: Yu et al. 2025, "DAPO" (overlong reward shaping). It differs from a hard
    truncation penalty in ramping up over the last `buffer` tokens. buffer = 0 gives a hard
    step at max_len. lengths are completion lengths (real tokens).
    """
    if buffer < 0 or buffer > max_len:
        raise ValueError(f"overlong buffer must be in [0, max_len={max_len}], got {buffer}")
    L = lengths.to(torch.float32) if not lengths.is_floating_point() else lengths
    expected = max_len - buffer
    ramp = (expected - L) / max(buffer, 1) * penalty
    out = torch.where(L > max_len, torch.full_like(L, -penalty), ramp)
    return torch.where(L <= expected, torch.zeros_like(L), out)


def sampling_support_logp(logits: Tensor, keep_mask: Tensor) -> Tensor:
    """Log-softmax restricted to the support kept at sampling time (top-k / top-p).  # [..., V]

    logp = log_softmax(where(keep, logits, -inf)); -inf outside the support.

    Paper: DeepSeek-AI 2025, "DeepSeek-V3.2" (keep sampling mask). It differs from the plain
    log_softmax in renormalising over the same truncated support the sampler used, so the
    trainer's pi_old / pi_theta and the sampler's distribution have the same support. The
    sampled token is always kept; a row with nothing kept would be NaN.
    """
    return torch.log_softmax(logits.masked_fill(~as_bool(keep_mask), float("-inf")), dim=-1)
