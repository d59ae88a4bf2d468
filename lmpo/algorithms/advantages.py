"""Advantage estimators: group statistics (GRPO family), leave-one-out, GAE, REINFORCE++,
process supervision, and the `ADVANTAGES` registry the training loop calls.

Conventions: N = prompts x group_size rows, ordered group by group (rows i*G ... i*G+G-1
share a prompt); `mask` [N, T] is float or bool, 1 = real completion token. Masked positions
may hold garbage (even NaN/inf) and never change a result. These functions are plain tensor
math; the loop calls them under `torch.no_grad()` (advantages are constants of the loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from ._common import as_bool, check_groups, clean, per_token, place_on_last_token

__all__ = [
    "grpo_advantages",
    "rloo_advantages",
    "gae_advantages",
    "reinforce_pp_advantages",
    "process_advantages",
    "whiten",
    "ADVANTAGES",
    "AdvantageInputs",
    "register_advantage",
]


def _float(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.float()


def grpo_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """Group-relative advantage of GRPO.

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps), std = the unbiased std (divides by k-1).

    Paper: Shao et al. 2024, "DeepSeekMath" (GRPO). It differs from PPO's advantage in
    replacing a learned critic by the statistics of G samples of the same prompt.

    scale="group": divide by the group's unbiased std (GRPO).
    scale="batch": subtract the group mean, then divide by the unbiased std of the batch's
        rewards (Liu et al. 2025, "Tricks or Traps? A Deep Dive into RL for LLM Reasoning"
        (Lite PPO), as TRL's scale_rewards="batch"); it differs from "group" in using one
        global scale, robust to groups whose rewards barely vary.
    scale="none": only subtract the group mean (Dr. GRPO, Liu et al. 2025, which removes the
        std because it up-weights too-easy / too-hard prompts).

    Invalid samples (reward NaN) are left out of every statistic: mean and std of a group are
    over its k valid rows, the batch std over all valid rows; an invalid row gets advantage 0.
    A group with one valid row (or of size 1) has advantage 0 (its std is undefined; 0, never NaN).
    Statistics are taken in float64 (sums of rewards near 3e38 do not overflow) and the result
    has the rewards' float dtype; a complete group (every row valid) of a "group" or "none"
    scale is computed as before in the rewards' dtype with torch's mean and std, bit for bit the
    numbers lmpo's figures were measured with, unless that overflows.
    """
    r = _float(rewards)  # [N]
    n_groups = check_groups(r.shape[0], group_size)
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale={scale!r}; allowed: 'group', 'batch', 'none'")
    g = r.view(n_groups, group_size)  # [B, G]
    valid = ~torch.isnan(g)  # [B, G]
    x = clean(g.double(), valid)  # [B, G]
    k = valid.sum(-1, keepdim=True).double()  # [B, 1] valid rows per group
    mean = x.sum(-1, keepdim=True) / k.clamp(min=1)  # [B, 1]
    adv = clean(x - mean, valid)  # [B, G] group-centred
    if scale == "group":
        adv = adv / (_std(adv, valid, k) + eps)
    elif scale == "batch":
        n = valid.sum().double()
        adv = adv / (_std(clean(x - x.sum() / n.clamp(min=1), valid), valid, n) + eps)
    if scale != "batch" and group_size > 1:  # complete groups: the float32 computation of before
        fast = g - g.mean(-1, keepdim=True)  # [B, G]
        std = g.std(-1, keepdim=True) if scale == "group" else torch.zeros_like(fast[:, :1])  # [B, 1]
        use = valid.all(-1, keepdim=True) & torch.isfinite(fast) & torch.isfinite(std)
        fast = fast / (std + eps) if scale == "group" else fast
        return torch.where(use, fast, adv.to(r.dtype)).reshape(-1)
    return adv.reshape(-1).to(r.dtype)


def _std(centred: Tensor, valid: Tensor, k: Tensor) -> Tensor:
    """Unbiased std sqrt(sum(centred^2) / (k - 1)) over the valid entries of the last dim
    (of everything when k is 0-dim); 0 when k <= 1."""
    sq = clean(centred ** 2, valid)
    ss = sq.sum(-1, keepdim=True) if k.dim() else sq.sum()
    return (ss / (k - 1).clamp(min=1)).sqrt()


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantage.

    A_i = r_i - (1/(k-1)) * sum_{j != i, j valid in group} r_j  = k/(k-1) * (r_i - mean_g(r)).

    Paper: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization
    for Learning from Human Feedback in LLMs" (Kool et al. 2019 for the estimator). It
    differs from GRPO's mean baseline in excluding the sample itself (so the baseline is
    independent of r_i and the gradient unbiased) and in not dividing by a std.
    Invalid samples (reward NaN) are in no baseline and get advantage 0; k counts a group's
    valid rows; a group with k <= 1 (or of size 1) has advantage 0. Sums in float64 (no
    overflow); the result has the rewards' float dtype.
    """
    r = _float(rewards)  # [N]
    n_groups = check_groups(r.shape[0], group_size)
    g = r.view(n_groups, group_size)  # [B, G]
    valid = ~torch.isnan(g)  # [B, G]
    x = clean(g.double(), valid)  # [B, G]
    k = valid.sum(-1, keepdim=True).double()  # [B, 1]
    baseline = (x.sum(-1, keepdim=True) - x) / (k - 1).clamp(min=1)  # [B, G]
    adv = torch.where(valid & (k > 1), x - baseline, torch.zeros_like(x))
    return adv.reshape(-1).to(r.dtype)


def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation over completion tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    returns_t = A_t + V_t; the value after the last real token is 0 (episode ends).

    Paper: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
    Advantage Estimation"; used by PPO for LLMs (Ouyang et al. 2022). It differs from the
    Monte-Carlo return in bootstrapping from a learned critic V, trading bias for variance
    with lam.

    Masked positions are skipped: t+1 means "the next real token", so a mask with holes
    (e.g. tool output inside a completion) links real tokens across the hole; rewards and
    values at masked positions are ignored. Output is 0 at masked positions.
    Returns (advantages [N, T], returns [N, T]).
    """
    m = as_bool(mask)  # [N, T]
    r = clean(_float(token_rewards), m)  # [N, T]
    v = clean(_float(values), m).to(r.dtype)  # [N, T]
    n, t_len = m.shape
    next_v = torch.zeros(n, dtype=r.dtype, device=r.device)  # [N]
    next_a = torch.zeros_like(next_v)  # [N]
    zero = torch.zeros_like(next_v)
    out = []
    for t in range(t_len - 1, -1, -1):
        mt = m[:, t]
        delta = r[:, t] + gamma * next_v - v[:, t]
        a = delta + gamma * lam * next_a
        next_a = torch.where(mt, a, next_a)
        next_v = torch.where(mt, v[:, t], next_v)
        out.append(torch.where(mt, a, zero))
    adv = torch.stack(out[::-1], dim=1) if out else r.clone()  # [N, T]
    returns = clean(adv + v, m)  # [N, T]
    return adv, returns


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening over all real positions of the batch.

    shift_mean=True: (x - mu) / sqrt(var + eps); shift_mean=False: x / sqrt(var + eps)
    (rescaled, mean kept, so signs are preserved). mu and var are the mean and the
    population (biased, divide by n) variance over the real positions; biased so that a
    single real position is well defined (it whitens to 0). Zero at masked positions.
    Used for PPO's advantage normalisation and by REINFORCE++ (Hu 2025).
    """
    m = as_bool(mask).expand(x.shape)
    xc = clean(_float(x), m)
    n = m.sum().to(xc.dtype).clamp(min=1)
    mu = xc.sum() / n
    var = clean((xc - mu) ** 2, m).sum() / n
    out = (xc - mu) if shift_mean else xc
    return clean(out * torch.rsqrt(var + eps), m)


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """REINFORCE++ advantage: the discounted reward-to-go, whitened over the batch.

    G_t = sum_{s >= t, s real} gamma^(number of real tokens from t to s, exclusive) r_s,
    A = whiten(G) over all real tokens of the batch (population variance, see `whiten`).

    Paper: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
    Language Models" (discounted return, as verl's implementation). It differs from GRPO in
    using a global (batch) normalisation instead of per-prompt group statistics, and per-token
    returns (KL-in-reward makes them differ). Masked positions are skipped like GAE's holes
    (the return is GAE's with V = 0 and lam = 1). Computed in float64 (sums of huge rewards do
    not overflow); the result has the rewards' float dtype. Zero at masked positions.
    """
    m = as_bool(mask)  # [N, T]
    r = clean(_float(token_rewards), m)  # [N, T]
    returns, _ = gae_advantages(r.double(), torch.zeros_like(r, dtype=torch.float64), m, gamma=gamma, lam=1.0)
    return whiten(returns, m).to(r.dtype)


def process_advantages(
    step_rewards: Tensor, step_ends: Tensor, mask: Tensor, group_size: int, eps: float = 1e-4
) -> Tensor:
    """Process-supervised advantage of DeepSeekMath (GRPO with step rewards).

    r~_{i,j} = (r_{i,j} - mean(R_g)) / (std(R_g) + eps) over R_g = ALL real step rewards of
    the group (every step of every sample of the prompt), std unbiased (n-1), eps = 1e-4
    as in `grpo_advantages`; then A_{i,t} = sum_{j : end_{i,j} >= t} r~_{i,j}.

    Paper: Shao et al. 2024, "DeepSeekMath", section 4.1.3. It differs from outcome GRPO in
    normalising step rewards instead of one reward per sample and giving each token the sum
    of the normalised rewards of the steps that end at or after it.

    step_rewards [N, S] padded with NaN; step_ends [N, S] 0-based token index into the
    completion where the step ends, padded with -1 (ends >= T count as the last column).
    A group with a single real step has std 0 (its step normalises to 0). Zero at masked
    positions.
    """
    m = as_bool(mask)  # [N, T]
    n, t_len = m.shape
    n_groups = check_groups(n, group_size)
    sr = _float(step_rewards)  # [N, S]
    ends = step_ends.long()  # [N, S]
    valid = ~torch.isnan(sr) & (ends >= 0)  # [N, S]
    r = clean(sr, valid)  # [N, S]
    rg, vg = r.reshape(n_groups, -1), valid.reshape(n_groups, -1)  # [B, G*S]
    cnt = vg.sum(-1, keepdim=True).to(r.dtype)  # [B, 1]
    mu = rg.sum(-1, keepdim=True) / cnt.clamp(min=1)  # [B, 1]
    ss = clean((rg - mu) ** 2, vg).sum(-1, keepdim=True)  # [B, 1]
    std = torch.sqrt(ss / (cnt - 1).clamp(min=1))  # [B, 1]; 0 when cnt <= 1
    norm = clean((rg - mu) / (std + eps), vg).reshape(n, -1)  # [N, S]
    idx = clean(ends, valid).clamp(max=t_len - 1)  # [N, S]
    at_end = torch.zeros(n, t_len, dtype=r.dtype, device=r.device).scatter_add(1, idx, norm)  # [N, T]
    adv = at_end.flip(-1).cumsum(-1).flip(-1)  # [N, T]: sum over steps ending at or after t
    return clean(adv, m)


# ---------------------------------------------------------------------------------------------
# Registry: one signature for every estimator.
#   fn(x: AdvantageInputs) -> (adv [N, T], returns [N, T] | None)
# rewards NaN marks an invalid sample (its reward failed): it is left out of every group and
# batch statistic and its row gets advantage 0 (and returns 0).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may read: the batch's rewards [N] (NaN = invalid sample), the
    completion mask [N, T], the group size G, and, when the loop has them, per-token rewards [N, T]
    (KL in the reward, environment turns), the critic's values [N, T], process rewards [N, S] with
    their step ends [N, S], and the discount γ, GAE's λ and the std floor ε."""

    rewards: Tensor
    mask: Tensor
    group_size: int
    token_rewards: Optional[Tensor] = None
    values: Optional[Tensor] = None
    step_rewards: Optional[Tensor] = None
    step_ends: Optional[Tensor] = None
    gamma: float = 1.0
    lam: float = 0.95
    eps: float = 1e-4


AdvantageFn = Callable[..., "tuple[Tensor, Optional[Tensor]]"]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register `fn` in ADVANTAGES under `name` (must use the registry signature)."""

    def deco(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGES[name] = fn
        return fn

    return deco


def _valid_mask(rewards: Tensor, mask: Tensor) -> Tensor:
    """The token mask [N, T] with the rows of invalid samples (reward NaN) removed."""
    return as_bool(mask) & ~torch.isnan(_float(rewards))[:, None]


def _sequence_rewards(rewards: Tensor, token_rewards: Optional[Tensor], m: Tensor) -> Tensor:
    """Sequence rewards [N]: `rewards`, or the row sum of `token_rewards` over real tokens when
    given (so KL-in-reward reaches sequence-level estimators); NaN where `rewards` is NaN."""
    r = _float(rewards)
    if token_rewards is None:
        return r
    total = clean(_float(token_rewards), m).sum(-1)
    return torch.where(torch.isnan(r), r, total.to(r.dtype))


def _token_rewards(rewards: Tensor, token_rewards: Optional[Tensor], m: Tensor) -> Tensor:
    """Per-token rewards [N, T]: `token_rewards`, or `rewards` on each row's last real token."""
    if token_rewards is not None:
        return clean(_float(token_rewards), m)
    return place_on_last_token(_float(rewards), m)


def _group_adv(scale, x: AdvantageInputs):
    m = _valid_mask(x.rewards, x.mask)
    adv = grpo_advantages(_sequence_rewards(x.rewards, x.token_rewards, m), x.group_size, scale=scale, eps=x.eps)
    return per_token(adv, m), None


@register_advantage("group_norm")
def _group_norm(x: AdvantageInputs):
    """GRPO: grpo_advantages(scale="group") broadcast to [N, T]."""
    return _group_adv("group", x)


@register_advantage("group_mean")
def _group_mean(x: AdvantageInputs):
    """Dr. GRPO: grpo_advantages(scale="none") broadcast to [N, T]."""
    return _group_adv("none", x)


@register_advantage("batch_norm")
def _batch_norm(x: AdvantageInputs):
    """Lite PPO / TRL scale_rewards="batch": grpo_advantages(scale="batch") broadcast to [N, T]."""
    return _group_adv("batch", x)


@register_advantage("leave_one_out")
def _leave_one_out(x: AdvantageInputs):
    """RLOO: rloo_advantages broadcast to [N, T]."""
    m = _valid_mask(x.rewards, x.mask)
    adv = rloo_advantages(_sequence_rewards(x.rewards, x.token_rewards, m), x.group_size)
    return per_token(adv, m), None


@register_advantage("reinforce_pp")
def _reinforce_pp(x: AdvantageInputs):
    """REINFORCE++: reinforce_pp_advantages on token_rewards (or rewards on the last token), discount gamma."""
    m = _valid_mask(x.rewards, x.mask)
    return reinforce_pp_advantages(_token_rewards(x.rewards, x.token_rewards, m), m, gamma=x.gamma), None


@register_advantage("gae")
def _gae(x: AdvantageInputs):
    """PPO: gae_advantages on token_rewards (or rewards on the last token); needs values."""
    if x.values is None:
        raise ValueError("advantage 'gae' needs values (a critic); got values=None")
    m = _valid_mask(x.rewards, x.mask)
    return gae_advantages(_token_rewards(x.rewards, x.token_rewards, m), x.values, m, gamma=x.gamma, lam=x.lam)


@register_advantage("process")
def _process(x: AdvantageInputs):
    """DeepSeekMath process supervision: process_advantages; needs step_rewards and step_ends.
    The steps of invalid samples (reward NaN) are left out of the group statistics."""
    if x.step_rewards is None or x.step_ends is None:
        raise ValueError("advantage 'process' needs step_rewards and step_ends")
    m = _valid_mask(x.rewards, x.mask)
    sr = _float(x.step_rewards)  # [N, S]
    sr = torch.where(torch.isnan(_float(x.rewards))[:, None], torch.full_like(sr, float("nan")), sr)
    return process_advantages(sr, x.step_ends, m, x.group_size, eps=x.eps), None
