"""Stopping a run so that ``--resume`` continues the same run.

SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before it kills a job) do not interrupt a step:
the loop finishes the step in progress, writes a checkpoint of it and stops with ``Interrupted``
(exit status 130 / 143 from ``lmpo train``). A second signal stops at once; the checkpoint is then
the last whole step's (``lmpo.rl.loop.train`` rewinds the prompt stream and RNG when the update had not begun,
and keeps the previous checkpoint otherwise).
"""

from __future__ import annotations

import signal
import sys
import threading

import torch

from lmpo.parallel import torchrun as D


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal; ``code`` is the exit status (128 + the signal number)."""

    def __init__(self, signum: int, step: int | None = None, checkpoint=None, at_once: bool = False):
        self.signum, self.step, self.checkpoint, self.at_once = signum, step, checkpoint, at_once
        self.code = 128 + signum
        super().__init__(self.message())

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.at_once:
            return (f"stopped at once by a second {name}; the last checkpoint is kept, rerun with --resume to "
                    "continue from it.")
        if not self.step:
            return f"stopped by {name} before the first step; nothing to save."
        where = f" ({self.checkpoint})" if self.checkpoint else ""
        return f"stopped by {name} after step {self.step}; checkpoint{where} written, rerun with --resume to continue."


class StopSignals:
    """While active (in the main thread), SIGINT and SIGTERM set ``signum`` instead of raising;
    ``requested(world, device)`` is the signal every rank agrees on (one all-reduce per step with several).
    ``ray_learner``: the loop runs in the Ray learner actor, which shares the driver's terminal, so
    only the SIGTERM the driver forwards counts."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, ray_learner: bool = False):
        self.signum, self.old, self.ray_learner = None, {}, ray_learner

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM,) if self.ray_learner else self.SIGNALS:
                self.old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum, at_once=True)
        self.signum = signum
        print(f"\nlmpo: {signal.Signals(signum).name}: finishing this step, then writing a checkpoint "
              "(send it again to stop at once).", file=sys.stderr, flush=True)

    def requested(self, world: D.World, device) -> int | None:
        if not world.multi:
            return self.signum
        got = D.all_sum(world, {s: torch.tensor(float(self.signum == s), device=device) for s in self.SIGNALS})
        return next((int(s) for s in reversed(self.SIGNALS) if got[s] > 0), None)     # SIGTERM first
