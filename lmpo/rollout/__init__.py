"""Rollout engines and the ``RolloutBatch`` that carries a step's data."""

from .batch import RolloutBatch
from .sampler import filter_logits, generate, group_uniforms, rollout, sample_tokens

__all__ = ["RolloutBatch", "filter_logits", "generate", "group_uniforms", "rollout", "sample_tokens"]
