"""Built-in verifiable tasks. The embedded one: 2-digit + 2-digit addition ("37+48=" -> "85")."""

from __future__ import annotations

import random

ADDITION = "addition"
HELDOUT_SIZE = 200
HELDOUT_SEED = 1234


def _pair_rows(pairs):
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]


def addition_heldout(n: int = HELDOUT_SIZE) -> list[dict]:
    """The fixed held-out set: ``n`` distinct pairs drawn once with a fixed seed, never trained on."""
    rng = random.Random(HELDOUT_SEED)
    pairs = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], HELDOUT_SIZE)
    return _pair_rows(pairs[:n])


def addition_rows(n: int, seed: int) -> list[dict]:
    """``n`` training rows (``prompt``, ``answer``, ``completion``) drawn uniformly from the pairs
    that are not in the held-out set."""
    held = {r["prompt"] for r in addition_heldout()}
    pool = [(a, b) for a in range(10, 100) for b in range(10, 100) if f"{a}+{b}=" not in held]
    rng = random.Random(seed)
    rows = _pair_rows(rng.choice(pool) for _ in range(n))
    for r in rows:
        r["completion"] = r["answer"]
    return rows
