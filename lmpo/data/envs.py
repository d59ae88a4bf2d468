"""Built-in multi-turn environments on the embedded task (2-digit addition), one of each kind.

An environment (``lmpo.rollout.env``) has ``reset(row, seed) -> first observation`` and
``step(text) -> (observation, reward, done)``, and says whether ``reset`` can put it back into
the same state (``resettable``):

- ``addition_retry`` (resettable): the row's sum; a wrong first answer is answered with
  feedback and a second try. Turn rewards 1 (right at the first try) or 0.5 (right at the second).
  ``reset(row, seed)`` depends on the row only, so G episodes of a group start in the same state.
- ``addition_chain`` (not resettable): a live counter. Each episode draws its own hidden start
  (two operands the row does not fix) and, after the model's answer x, a fresh operand c and asks
  for x + c: the second state depends on what the model answered. Two episodes never start from
  the same state, so a group is G episodes of the same row from G different states.

Observations are plain text (the embedded model has no chat template); the rollout renders them
with the tokenizer's chat template when there is one.
"""

from __future__ import annotations

import random


def _answer(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 4 else None


class AdditionRetry:
    """``a+b=`` from the row; wrong → ``"no "`` feedback and the same question again (one retry)."""

    resettable = True

    def reset(self, row: dict, seed: int) -> str:
        self.question = str(row["prompt"])
        self.gold = int(row["answer"])
        self.tries = 0
        return self.question

    def step(self, text: str):
        self.tries += 1
        if _answer(text) == self.gold:
            return None, (1.0 if self.tries == 1 else 0.5), True
        if self.tries >= 2:
            return None, 0.0, True
        return f"no {self.question}", 0.0, False


class AdditionChain:
    """A counter whose state is drawn anew each episode: ``a+b=`` (both drawn here, 10..49), then
    ``x+c=`` with x the model's answer and c a fresh draw. Reward 1 per correct turn; a non-number
    or a first answer outside 10..99 ends the episode. ``seed`` only makes a run reproducible:
    the loop never gives two episodes the same seed, as the state cannot be replayed."""

    resettable = False

    def reset(self, row: dict, seed: int) -> str:
        self.rng = random.Random(seed)
        a, b = self.rng.randint(10, 49), self.rng.randint(10, 49)
        self.gold, self.turn = a + b, 0
        return f"{a}+{b}="

    def step(self, text: str):
        self.turn += 1
        x = _answer(text)
        reward = 1.0 if x == self.gold else 0.0
        if self.turn >= 2 or x is None or not 10 <= x <= 99:
            return None, reward, True
        c = self.rng.randint(10, 99)
        self.gold = x + c
        return f"{x}+{c}=", reward, False


ENVIRONMENTS = {"addition_retry": AdditionRetry, "addition_chain": AdditionChain}
