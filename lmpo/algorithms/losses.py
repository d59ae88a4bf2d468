"""Policy loss (PPO clip, clip-higher, dual clip, GSPO sequence ratio), value loss, clip
fraction and loss aggregation (`AGGREGATIONS`).

Per-token losses are [N, T] and zero at masked positions; `aggregate_loss` turns them into a
scalar. Garbage (NaN/inf) at masked positions is removed with torch.where before any
arithmetic, so it reaches neither a value nor a gradient.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from ._common import as_bool, clean, per_sequence, per_token, row_counts

__all__ = ["policy_loss", "clip_fraction", "aggregate_loss", "value_loss", "AGGREGATIONS"]

Number = Union[int, float, Tensor]


def _clipped_objective(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                       dual_clip: Optional[float]) -> tuple[Tensor, Tensor]:
    """(loss, clipped_active): loss = max(-ratio*A, -clip(ratio)*A), dual-clipped for A < 0."""
    unclipped = -ratio * adv
    clipped = -torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    active = clipped > unclipped  # the min of the objective picks the clipped term and it differs
    loss = torch.where(active, clipped, unclipped)  # ties take the unclipped branch (full gradient)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        bound = -dual_clip * adv  # > 0 for A < 0
        loss = torch.where((adv < 0) & (loss > bound), bound, loss)
    return loss, active


def _sequence_ratio(logp: Tensor, old_logp: Tensor, m: Tensor) -> Tensor:
    """GSPO's s_i = exp(mean over real tokens of (logp - old_logp)).  # [N]"""
    log_ratio = clean(logp - old_logp.detach(), m)  # [N, T]
    n = row_counts(m, log_ratio.dtype).clamp(min=1)  # [N]
    return torch.exp(log_ratio.sum(-1) / n)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    level: str = "token",
    dual_clip: Optional[float] = None,
) -> Tensor:
    """Clipped surrogate policy loss, per token.  # [N, T]

    level="token" (PPO, Schulman et al. 2017; asymmetric clip = DAPO's clip-higher, Yu et al.
    2025): rho_t = exp(logp_t - old_logp_t),
        loss_t = -min(rho_t * A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_t).
    DAPO differs from PPO only in eps_high > eps_low (low-probability tokens may grow more).

    level="sequence" (GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization"):
        s_i = exp((1/|y_i|) * sum_t (logp_t - old_logp_t))   (geometric mean of token ratios),
        loss_i = -min(s_i * A_i, clip(s_i, 1 - eps_low, 1 + eps_high) * A_i),
    and loss_i is written on every real token of row i, so "seq-mean-token-mean" aggregation
    gives exactly GSPO's objective. It differs from PPO/GRPO in clipping whole sequences by
    one length-normalised ratio instead of each token. Advantages should be [N]; [N, T]
    advantages are reduced to the mean over each row's real tokens.

    dual_clip=c > 1 (Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep RL"):
    for A < 0 the loss is additionally bounded, loss = min(loss, -c * A), so a huge ratio on a
    bad sample cannot produce an unbounded loss (its gradient is then 0).

    advantages: [N] (broadcast over tokens) or [N, T]. old_logp is detached. With
    rho = 1 the gradient is the REINFORCE gradient -A * grad(logp). Zero at masked positions.
    """
    m = as_bool(mask)  # [N, T]
    advantages = advantages.detach()
    if level == "token":
        adv = per_token(advantages, m)  # [N, T]
        ratio = torch.exp(clean(logp - old_logp.detach(), m))  # [N, T]
        loss, _ = _clipped_objective(ratio, adv, eps_low, eps_high, dual_clip)  # [N, T]
    elif level == "sequence":
        adv = per_sequence(advantages, m)  # [N]
        ratio = _sequence_ratio(logp, old_logp, m)  # [N]
        loss, _ = _clipped_objective(ratio, adv, eps_low, eps_high, dual_clip)  # [N]
        loss = loss[:, None].expand(m.shape)  # [N, T]
    else:
        raise ValueError(f"level={level!r}; allowed: 'token', 'sequence'")
    return clean(loss, m)


@torch.no_grad()
def clip_fraction(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    level: str = "token",
) -> Tensor:
    """Fraction of real tokens (level="token") or of non-empty sequences (level="sequence")
    where the clipped branch of the PPO objective is active: A > 0 and ratio > 1 + eps_high,
    or A < 0 and ratio < 1 - eps_low (the min picks the clipped term and it differs).
    Scalar tensor; 0 when there is nothing real. Metric `actor/clip_frac`."""
    m = as_bool(mask)
    if level == "token":
        adv = per_token(advantages, m)
        ratio = torch.exp(clean(logp - old_logp, m))
        _, active = _clipped_objective(ratio, adv, eps_low, eps_high, None)
        real = m
    elif level == "sequence":
        adv = per_sequence(advantages, m)
        ratio = _sequence_ratio(logp, old_logp, m)
        _, active = _clipped_objective(ratio, adv, eps_low, eps_high, None)
        real = m.any(-1)
    else:
        raise ValueError(f"level={level!r}; allowed: 'token', 'sequence'")
    dtype = ratio.dtype
    return (active & real).sum().to(dtype) / real.sum().to(dtype).clamp(min=1)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: Optional[float] = 0.2) -> Tensor:
    """Clipped critic loss, per token.  # [N, T]

    loss_t = 1/2 * max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2);
    clip=None gives the unclipped 1/2 * (V_t - R_t)^2.

    Paper: PPO's value clipping as in OpenAI baselines (Schulman et al. 2017; discussed by
    Engstrom et al. 2020, "Implementation Matters"). It differs from plain regression in
    never letting one update move V further than c from the rollout-time value V_old where
    that would reduce the loss. Zero at masked positions.
    """
    m = as_bool(mask)
    v = clean(values, m)  # [N, T]
    r = clean(returns, m).to(v.dtype)  # [N, T]
    err = (v - r) ** 2
    if clip is not None:
        v_old = clean(old_values, m).to(v.dtype).detach()
        v_clipped = v_old + torch.clamp(v - v_old, -clip, clip)
        err = torch.maximum(err, (v_clipped - r) ** 2)
    return clean(0.5 * err, m)


# ---------------------------------------------------------------------------------------------
# Aggregation: per-token loss [N, T] -> scalar. One signature:
#   fn(per_token, mask, *, max_len=None, global_tokens=None, global_seqs=None) -> scalar
# Sequences without real tokens contribute nothing and are not counted.
# ---------------------------------------------------------------------------------------------


def _seq_count(m: Tensor, dtype: torch.dtype, global_seqs: Optional[Number]) -> Number:
    if global_seqs is not None:
        return global_seqs
    return m.any(-1).sum().to(dtype).clamp(min=1)


def _token_mean(per_tok: Tensor, mask: Tensor, *, max_len=None, global_tokens=None, global_seqs=None):
    """DAPO: sum over all real tokens / number of real tokens (long answers weigh more)."""
    m = as_bool(mask)
    x = clean(per_tok, m)
    denom = global_tokens if global_tokens is not None else m.sum().to(x.dtype).clamp(min=1)
    return x.sum() / denom


def _seq_mean_token_mean(per_tok: Tensor, mask: Tensor, *, max_len=None, global_tokens=None,
                         global_seqs=None):
    """GRPO: mean over sequences of (1/|o_i|) * sum over the sequence's real tokens."""
    m = as_bool(mask)
    x = clean(per_tok, m)
    per_seq = x.sum(-1) / row_counts(m, x.dtype).clamp(min=1)  # [N]
    return per_seq.sum() / _seq_count(m, x.dtype, global_seqs)


def _seq_mean_token_sum_norm(per_tok: Tensor, mask: Tensor, *, max_len=None, global_tokens=None,
                             global_seqs=None):
    """Dr. GRPO: mean over sequences of (1/max_len) * sum over the sequence's real tokens."""
    if max_len is None:
        raise ValueError("loss_agg 'seq-mean-token-sum-norm' needs max_len (the generation "
                         "budget, e.g. max_new_tokens); it never defaults to the padded width")
    m = as_bool(mask)
    x = clean(per_tok, m)
    per_seq = x.sum(-1) / max_len  # [N]
    return per_seq.sum() / _seq_count(m, x.dtype, global_seqs)


AGGREGATIONS: dict[str, Callable[..., Tensor]] = {
    "seq-mean-token-mean": _seq_mean_token_mean,
    "token-mean": _token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "seq-mean-token-mean",
    max_len: Optional[int] = None,
    global_tokens: Optional[Number] = None,
    global_seqs: Optional[Number] = None,
) -> Tensor:
    """Per-token loss [N, T] -> scalar.

    "seq-mean-token-mean" (GRPO, Shao et al. 2024): (1/N') sum_i (1/|o_i|) sum_t l_it.
    "token-mean" (DAPO, Yu et al. 2025): sum_it l_it / sum_i |o_i|; differs from GRPO in
        weighting each token equally, so long bad answers are not under-penalised.
    "seq-mean-token-sum-norm" (Dr. GRPO, Liu et al. 2025): (1/N') sum_i (1/L) sum_t l_it with
        the constant L = max_len (required; never the padded width T); differs from GRPO in
        removing the length bias of 1/|o_i|.
    N' counts sequences with at least one real token (empty rows add nothing, never NaN).
    global_tokens / global_seqs: when given, they replace the local counts |o| and N' as the
    divisors, so the sum over data-parallel ranks of the local losses equals the full-batch
    loss. Padding columns or rows never change the result.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss_agg={mode!r}; allowed: {sorted(AGGREGATIONS)}")
    return AGGREGATIONS[mode](per_token, mask, max_len=max_len, global_tokens=global_tokens,
                              global_seqs=global_seqs)
