"""The rewards an environment gave during an episode (``lmpo.rollout.env``), as reward sources.

A multi-turn rollout puts each episode's turn rewards in its row: ``env_reward`` (their sum),
``env_turn_rewards`` and ``env_turn_ends`` (the completion token index of each turn's last model
token). ``env_reward`` makes their sum the sequence reward (GRPO, RLOO, ...); with a critic the
loop places each turn's reward on its own turn end for GAE. ``env_turns`` gives the turns as
process steps (``algo.advantage: process``).
"""

from __future__ import annotations

from .process import process_reward


def env_reward(prompts, completions, env_reward=None, **_columns):
    """The episode's summed environment reward (None for rows that did not come from an environment)."""
    return list(env_reward) if env_reward is not None else [None] * len(completions)


@process_reward
def env_turns(prompts, completions, env_turn_rewards=None, env_turn_ends=None, completion_ids=None, **_columns):
    """Each model turn as a process step: its environment reward, ending at the turn's last token."""
    if env_turn_rewards is None:
        return [None] * len(completions)
    return [{"rewards": list(r), "ends": list(e)} for r, e in zip(env_turn_rewards, env_turn_ends)]
