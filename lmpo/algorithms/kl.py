"""KL to the reference policy: per-token estimators (k1, k2, k3), DeepSeek-V3.2's
importance-sampling-corrected estimator, KL folded into the reward (InstructGPT), and the
adaptive KL coefficient (Ziegler et al. 2019)."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ._common import as_bool, clean, place_on_last_token

__all__ = ["kl_penalty", "unbiased_kl", "kl_in_reward", "turn_token_rewards", "adaptive_kl_coef", "KL_ESTIMATORS"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3", mask: Optional[Tensor] = None) -> Tensor:
    """Per-token sample estimate of KL(pi_theta || pi_ref) from tokens sampled by pi_theta.
    # [N, T]

    With d = logp - ref_logp (= -log r, r = pi_ref / pi_theta):
      k1 = d                      unbiased, high variance, can be negative;
      k2 = 1/2 d^2                biased as a value, low variance, >= 0; as a loss on
                                  on-policy samples its expected gradient is grad KL;
      k3 = exp(-d) - (-d) - 1     = (r - 1) - log r: unbiased, low variance, >= 0.
    Paper: Schulman 2020, "Approximating KL Divergence" (blog). k3 differs from k1 in adding
    the zero-mean control variate r - 1, which makes every sample non-negative.
    k3 is what GRPO (DeepSeekMath) puts in the loss; k1 is what PPO/InstructGPT put in the
    reward.

    The caller masks. `mask` is optional: when given, masked positions are replaced by 0
    BEFORE the exp (use it when padding holds garbage: exp(inf) in an unselected position
    still turns into a NaN gradient) and the output is 0 there.
    """
    d = logp - ref_logp  # [N, T]
    if mask is not None:
        d = clean(d, as_bool(mask))
    if kind == "k1":
        out = d
    elif kind == "k2":
        out = 0.5 * d ** 2
    elif kind == "k3":
        out = torch.exp(-d) + d - 1.0
    else:
        raise ValueError(f"kl estimator {kind!r}; allowed: {list(KL_ESTIMATORS)}")
    return out if mask is None else clean(out, as_bool(mask))


def unbiased_kl(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, kind: str = "k3",
                mask: Optional[Tensor] = None) -> Tensor:
    """DeepSeek-V3.2's importance-sampling-corrected KL estimate, per token.  # [N, T]

    est = (pi_theta / pi_old) * k3,  ratio = exp(logp - old_logp) NOT detached (old_logp is).

    Paper: DeepSeek-AI 2025, "DeepSeek-V3.2" (unbiased KL estimate). It differs from
    DeepSeekMath's GRPO in weighting k3 by the ratio, because the tokens come from pi_old, not
    from pi_theta.
    Derivation: for x ~ pi_old, E_old[(pi_theta/pi_old) k3(x)] = sum_x pi_theta(x) k3(x)
      = sum_x pi_ref(x) - sum_x pi_theta(x) log(pi_ref(x)/pi_theta(x)) - 1 = KL(pi_theta||pi_ref).
    This identity holds for every theta, so differentiating it gives
    E_old[grad est] = grad KL(pi_theta || pi_ref) exactly; the un-weighted k3 is only exact
    when pi_theta = pi_old. (kind="k1" is exact the same way; "k2" is not, since E[k2] != KL.)
    Optional `mask` as in `kl_penalty`.
    """
    d = logp - old_logp.detach()
    if mask is not None:
        d = clean(d, as_bool(mask))
    ratio = torch.exp(d)
    return ratio * kl_penalty(logp, ref_logp, kind=kind, mask=mask)


def kl_in_reward(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor,
                 beta: Union[float, Tensor], kind: str = "k1") -> Tensor:
    """Per-token reward with the KL penalty folded in (InstructGPT).  # [N, T]

    r_t = -beta * k(logp_t, ref_logp_t) on every real token, + score_i on the last real token,
    with k the estimator `kind` of `kl_penalty` (k1 = logp - ref_logp, InstructGPT's choice).

    Paper: Ouyang et al. 2022, "Training language models to follow instructions with human
    feedback" (after Ziegler et al. 2019). It differs from GRPO's KL-in-loss in making the KL
    part of the return, so it flows through the advantage (GAE / REINFORCE++ / RLOO) instead of
    the loss. scores [N] (placed on the last real token), or [N, T] rewards already per token
    (a multi-turn episode's turn rewards, ``turn_token_rewards``); beta a float or 0-dim tensor.
    Zero at masked positions; a row with no real tokens gets nothing (not even its score).
    """
    m = as_bool(mask)  # [N, T]
    kl = kl_penalty(logp, ref_logp, kind, mask=m)  # [N, T]
    placed = clean(scores, m) if scores.dim() == 2 else place_on_last_token(scores, m)
    return -beta * kl + placed.to(kl.dtype)


def turn_token_rewards(rewards: Tensor, turn_rewards: Tensor, weight: float, mask: Tensor) -> Tensor:
    """Per-token rewards of multi-turn episodes.  # [N, T]

    r_t = w * turn_t + [t = last real token] * (R - w * sum_t turn_t)

    with turn_t [N, T] an environment's turn rewards on each turn's last model token, w the weight
    of that reward source and R [N] the sequence reward (all sources). So every row still sums
    to R (sequence-level estimators see the same reward) while GAE sees each turn's reward where
    it was earned; what other sources give lands on the last token. Zero at masked positions.
    """
    m = as_bool(mask)  # [N, T]
    turns = clean(turn_rewards.to(rewards.dtype) * weight, m)  # [N, T]
    return turns + place_on_last_token(rewards - turns.sum(-1), m)


def adaptive_kl_coef(beta: float, observed_kl: float, target: float, horizon: float,
                     n_steps: float) -> float:
    """Adaptive KL coefficient (proportional controller).

    e = clip(observed_kl / target - 1, -0.2, 0.2),  beta <- beta * (1 + e * n_steps / horizon).

    Paper: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences". It
    differs from a fixed beta in steering the measured KL toward `target`: beta rises when
    KL > target and falls when below, by at most a factor 1 +- 0.2 * n_steps / horizon.
    Pure function on floats (n_steps = samples or steps since the last update).
    """
    e = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + e * n_steps / horizon)
