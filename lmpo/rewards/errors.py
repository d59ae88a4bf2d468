"""The reward layer's error type (its home is ``lmpo.errors``; imported from here too)."""

from lmpo.errors import RewardError  # noqa: F401
