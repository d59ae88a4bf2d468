"""lmpo: language-model policy optimization (PPO, GRPO and family) with one training loop."""

__version__ = "0.1.0"
