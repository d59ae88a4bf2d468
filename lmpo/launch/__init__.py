"""Launchers that run the loop somewhere else: the Ray backend (learner, rollout and reward actors).

``train`` is the entry point for every backend: the loop in this process (``lmpo.rl.loop.train``,
also under torchrun), or the Ray actors, which run the same loop in their learner.
"""

from __future__ import annotations

from lmpo.config import Config
from lmpo.io.checkpoint import no_space
from lmpo.io.rundir import guard, no_space_error
from lmpo.launch import ray_backend
from lmpo.rl import loop


def train(cfg: Config, resume: bool = False) -> dict:
    """Run RL with the backend ``distributed.backend`` names; returns the last step's metrics."""
    if cfg.distributed.backend != "ray":
        return loop.train(cfg, resume)
    try:
        with guard(cfg, resume):                                    # output_dir checked and locked before Ray starts
            return ray_backend.launch(cfg, resume)                  # the learner actor runs loop.train
    except BaseException as e:
        if no_space(e):
            raise no_space_error(cfg, e) from None
        raise
