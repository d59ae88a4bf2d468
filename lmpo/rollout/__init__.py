"""Rollout engines and the ``RolloutBatch`` that carries a step's data."""

from .batch import RolloutBatch
from .sampler import filter_logits, generate, rollout

__all__ = ["RolloutBatch", "filter_logits", "generate", "rollout"]
