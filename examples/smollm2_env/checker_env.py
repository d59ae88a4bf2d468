"""A two-turn chat environment for SmolLM2-135M-Instruct: chat addition with a checker tool's feedback
and a second try (docs/environments.md, "On a real model").

The first observation is the row's chat prompt ("What is 23 + 58? Reply with the number only.", the
rows of examples/smollm2_math). The model's reply is checked (its last number, as ``math_answer``
reads it); a wrong reply gets a ``tool`` message from the checker, rendered by SmolLM2's ChatML
template as ``<|im_start|>tool ... <|im_end|>`` followed by a new ``<|im_start|>assistant`` turn:

    check_answer(71): wrong. Reply with the correct sum of 23 + 58, the number only.

Turn rewards: 1 for a right first reply, 0.5 for a right second reply, else 0 (``env_reward`` sums
them). Resettable: ``reset`` depends on the row only, so GRPO's G episodes start from one state.

    lmpo train examples/smollm2_env/grpo.yaml        (env.name: examples/smollm2_env/checker_env.py:AdditionChecker)
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+")


def last_number(text: str) -> int | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return int(found[-1]) if found else None


class AdditionChecker:
    resettable = True

    def reset(self, row: dict, seed: int):
        self.gold = int(row["answer"])
        question = row["prompt"][-1]["content"]
        self.operands = re.search(r"(\d+) \+ (\d+)", question).groups()
        self.tries = 0
        return row["prompt"]

    def step(self, text: str):
        self.tries += 1
        got = last_number(text)
        if got == self.gold:
            return None, (1.0 if self.tries == 1 else 0.5), True
        if self.tries >= 2:
            return None, 0.0, True
        a, b = self.operands
        return ({"role": "tool", "content": f"check_answer({got if got is not None else 'no number'}): wrong. "
                                            f"Reply with the correct sum of {a} + {b}, the number only."}, 0.0, False)
