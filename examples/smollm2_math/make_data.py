"""The chat math task for SmolLM2-135M-Instruct: "What is 23 + 58?" as a chat message, the gold sum in
``answer`` (scored by the built-in ``math_answer``: the last number of the reply, compared by value).

    python examples/smollm2_math/make_data.py        # writes train.jsonl (2 000 rows) and heldout.jsonl (200)

The held-out pairs are drawn first from a fixed seed and never appear in train.jsonl.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOW, HIGH = 10, 99      # two-digit operands: the 135 M model gets some right before training, not most


def question(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}]


def rows(n_train: int = 2000, n_heldout: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    pairs = [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]
    held = random.Random(1234).sample(pairs, n_heldout)
    held_set = set(held)
    pool = [p for p in pairs if p not in held_set]
    rng = random.Random(seed)
    train = [rng.choice(pool) for _ in range(n_train)]

    def row(p):
        return {"prompt": question(*p), "answer": str(p[0] + p[1])}

    return [row(p) for p in train], [row(p) for p in held]


def main():
    train, held = rows()
    for name, rs in (("train.jsonl", train), ("heldout.jsonl", held)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
        print(HERE / name, len(rs))


if __name__ == "__main__":
    main()
