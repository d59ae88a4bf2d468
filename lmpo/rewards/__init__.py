"""Reward functions: verifiers (math, code in a sandbox), format/length shaping, remote
sources, and their combination for the training loop.

Reward functions are called as TRL 1.16's GRPOTrainer calls them, with keywords only:
``f(prompts=, completions=, completion_ids=, **columns, trainer_state=, log_metric=, log_extra=)
-> list[float | None]`` where ``columns`` are the dataset's other columns for those rows (lists
aligned with ``completions``); prompts and completions are strings, or chat messages for a
conversational dataset (see ``lmpo.rewards.combine`` and docs/rewards.md). Every built-in
accepts both forms and is importable as ``lmpo.rewards.<name>``. ``REWARD_FUNCS`` maps the
built-in names to them. Heavy dependencies (math-verify, sympy) load on first use.
"""

from .code_reward import code_tests
from .env_reward import env_reward, env_turns
from .errors import RewardError
from .format_reward import addition_exact, length_penalty, think_answer_format
from .math_reward import math_answer
from .process import addition_digit_steps, process_reward

REWARD_FUNCS = {
    "addition_exact": addition_exact,
    "math_answer": math_answer,
    "think_answer_format": think_answer_format,
    "length_penalty": length_penalty,
    "code_tests": code_tests,
    "addition_digit_steps": addition_digit_steps,
    "env_reward": env_reward,
    "env_turns": env_turns,
}

__all__ = ["REWARD_FUNCS", "RewardError", "process_reward", *REWARD_FUNCS]
