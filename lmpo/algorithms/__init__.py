"""Pure tensor math of lmpo's algorithms: advantage estimators, policy/value losses and
aggregation, KL estimators, masks, and the named presets. See docs/algorithms.md."""

from .advantages import (
    ADVANTAGES,
    AdvantageInputs,
    gae_advantages,
    grpo_advantages,
    process_advantages,
    register_advantage,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)
from .kl import KL_ESTIMATORS, adaptive_kl_coef, kl_in_reward, kl_penalty, turn_token_rewards, unbiased_kl
from .losses import AGGREGATIONS, aggregate_loss, clip_fraction, policy_loss, value_loss
from .masks import (
    off_policy_sequence_mask,
    overlong_penalty,
    sampling_support_logp,
    truncated_is_weights,
    zero_std_groups,
)
from .presets import PRESET_KEYS, PRESETS, overlong_buffer_tokens, preset_choices, resolve_preset

__all__ = [
    "ADVANTAGES", "AdvantageInputs", "register_advantage", "grpo_advantages", "rloo_advantages", "gae_advantages",
    "reinforce_pp_advantages", "process_advantages", "whiten",
    "AGGREGATIONS", "policy_loss", "clip_fraction", "aggregate_loss", "value_loss",
    "KL_ESTIMATORS", "kl_penalty", "unbiased_kl", "kl_in_reward", "turn_token_rewards", "adaptive_kl_coef",
    "off_policy_sequence_mask", "truncated_is_weights", "zero_std_groups", "overlong_penalty",
    "sampling_support_logp",
    "PRESETS", "PRESET_KEYS", "preset_choices", "resolve_preset", "overlong_buffer_tokens",
]
