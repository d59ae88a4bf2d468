"""Named algorithms as presets: a dict of independent choices the one training loop reads.

Every preset has exactly the keys of `PRESET_KEYS`. `resolve_preset(name, **overrides)`
merges overrides (None = keep the preset's value) and checks keys and values.
"""

from __future__ import annotations

import difflib
from typing import Any

from .advantages import ADVANTAGES
from .kl import KL_ESTIMATORS
from .losses import AGGREGATIONS

__all__ = ["PRESETS", "PRESET_KEYS", "preset_choices", "resolve_preset", "overlong_buffer_tokens"]

PRESET_KEYS = (
    "advantage",          # key of ADVANTAGES
    "ratio_level",        # "token" | "sequence" (GSPO)
    "eps_low",            # lower clip: ratio >= 1 - eps_low
    "eps_high",           # upper clip: ratio <= 1 + eps_high (clip-higher when > eps_low)
    "dual_clip",          # None | c > 1: loss <= -c * A for A < 0
    "loss_agg",           # key of AGGREGATIONS
    "kl_placement",       # "loss" | "reward" | "none"
    "kl_estimator",       # "k1" | "k2" | "k3"
    "unbiased_kl",        # bool: DeepSeek-V3.2 ratio-weighted KL in the loss
    "whiten_advantages",  # bool: whiten(adv, mask) after the estimator
    "critic",             # None | "separate" | "shared"
    "dynamic_sampling",   # bool: drop zero-std groups (DAPO)
    "overlong_buffer",    # int tokens, 0 = off, "auto" = max_new_tokens // 5 (DAPO soft overlong punishment)
    "overlong_penalty",   # float: the penalty at/over max_len
)

_BASE: dict[str, Any] = dict(
    advantage="group_norm", ratio_level="token", eps_low=0.2, eps_high=0.2, dual_clip=None,
    loss_agg="seq-mean-token-mean", kl_placement="loss", kl_estimator="k3", unbiased_kl=False,
    whiten_advantages=False, critic=None, dynamic_sampling=False, overlong_buffer=0,
    overlong_penalty=1.0,
)


def _preset(**changes: Any) -> dict[str, Any]:
    out = dict(_BASE)
    out.update(changes)
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeekMath GRPO: group-normalised advantage, per-sequence token mean, k3 KL in the loss.
    "grpo": _preset(),
    # InstructGPT-style PPO: critic + GAE, k1 KL in the reward, whitened advantages.
    "ppo": _preset(advantage="gae", loss_agg="token-mean", kl_placement="reward",
                   kl_estimator="k1", whiten_advantages=True, critic="separate"),
    # Dr. GRPO (Liu et al. 2025): no std, constant length normaliser, no KL (beta = 0 recipe).
    "dr_grpo": _preset(advantage="group_mean", loss_agg="seq-mean-token-sum-norm",
                       kl_placement="none"),
    # DAPO (Yu et al. 2025): clip-higher, token-mean, no KL, dynamic sampling, soft overlong
    # punishment over the last fifth of the generation budget (the paper: 4096 of 20480).
    "dapo": _preset(eps_high=0.28, loss_agg="token-mean", kl_placement="none",
                    dynamic_sampling=True, overlong_buffer="auto"),
    # GSPO (Zheng et al. 2025): sequence-level ratio, tiny clip range from the paper, no KL.
    "gspo": _preset(ratio_level="sequence", eps_low=3e-4, eps_high=4e-4, kl_placement="none"),
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline, KL (k1) in the reward as in the
    # paper's RLHF setting; sequence-level REINFORCE sums token log-probs, which
    # seq-mean-token-sum-norm reproduces up to the constant 1/max_len.
    "rloo": _preset(advantage="leave_one_out", loss_agg="seq-mean-token-sum-norm",
                    kl_placement="reward", kl_estimator="k1"),
    # REINFORCE++ (Hu 2025): batch-whitened reward-to-go (whitening is inside the estimator),
    # k1 KL in the reward, token-mean.
    "reinforce_pp": _preset(advantage="reinforce_pp", loss_agg="token-mean",
                            kl_placement="reward", kl_estimator="k1"),
}

_ALLOWED: dict[str, tuple] = {
    "ratio_level": ("token", "sequence"),
    "kl_placement": ("loss", "reward", "none"),
    "kl_estimator": KL_ESTIMATORS,
    "critic": (None, "separate", "shared"),
}


def preset_choices(key: str) -> tuple | None:
    """The values preset key `key` may take, read from the registries when called (an estimator
    or aggregation registered later is allowed at once); None for a number or a bool."""
    if key == "advantage":
        return tuple(ADVANTAGES)
    if key == "loss_agg":
        return tuple(AGGREGATIONS)
    return _ALLOWED.get(key)


def _check(cfg: dict[str, Any]) -> None:
    for key, allowed in _ALLOWED.items():
        if cfg[key] not in allowed:
            raise ValueError(f"{key}={cfg[key]!r}; allowed: {list(allowed)}")
    if cfg["advantage"] not in ADVANTAGES:
        raise ValueError(f"advantage={cfg['advantage']!r}; allowed: {sorted(ADVANTAGES)}")
    if cfg["loss_agg"] not in AGGREGATIONS:
        raise ValueError(f"loss_agg={cfg['loss_agg']!r}; allowed: {sorted(AGGREGATIONS)}")
    for key in ("eps_low", "eps_high"):
        if not 0 <= cfg[key] < 1:
            raise ValueError(f"{key}={cfg[key]!r}; allowed: a float in [0, 1)")
    if cfg["dual_clip"] is not None and not cfg["dual_clip"] > 1:
        raise ValueError(f"dual_clip={cfg['dual_clip']!r}; allowed: None or a float > 1")
    ob = cfg["overlong_buffer"]
    if ob != "auto" and (isinstance(ob, str) or int(ob) != ob or ob < 0):
        raise ValueError(f"overlong_buffer={ob!r}; allowed: an int >= 0 or 'auto'")


def overlong_buffer_tokens(value, max_new_tokens: int) -> int:
    """The overlong buffer in tokens: an int as it is; "auto" (the DAPO preset) = max_new_tokens // 5,
    the paper's ratio (4096 of 20480), so the preset fits any generation budget (0 = off below 5)."""
    return max_new_tokens // 5 if value == "auto" else int(value)


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The preset `name` with every override that is not None applied (None keeps the
    preset's value). Raises ValueError for an unknown preset (listing the names, with a
    did-you-mean), an unknown key (naming it), or a bad value (naming the allowed ones)."""
    if name not in PRESETS:
        raise ValueError(f"unknown algorithm preset {name!r}{_did_you_mean(name, PRESETS)}; "
                         f"allowed: {sorted(PRESETS)}")
    unknown = [k for k in overrides if k not in PRESET_KEYS]
    if unknown:
        raise ValueError(f"unknown preset key {unknown[0]!r}{_did_you_mean(unknown[0], PRESET_KEYS)}; "
                         f"allowed: {list(PRESET_KEYS)}")
    cfg = dict(PRESETS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    _check(cfg)
    return cfg
