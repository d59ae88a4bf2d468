"""resolve_reward_funcs and compute_rewards: specs, weights, None/NaN/raise semantics, errors."""

import math
import threading

import pytest

import lmpo.rewards as rewards
from lmpo.rewards import REWARD_FUNCS, RewardError
from lmpo.rewards.combine import CallPolicy, RewardResult, compute_rewards, resolve_reward_funcs

BUILTINS = ["addition_exact", "math_answer", "think_answer_format", "length_penalty", "code_tests"]


def test_builtins_registered_and_importable():
    assert set(BUILTINS) <= set(REWARD_FUNCS)
    for name in BUILTINS:
        assert getattr(rewards, name) is REWARD_FUNCS[name]
    assert resolve_reward_funcs(BUILTINS) == [(n, REWARD_FUNCS[n]) for n in BUILTINS]


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, lmpo.rewards; print(sorted(m for m in ('sympy', 'math_verify', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_addition_exact():
    out = rewards.addition_exact(["37+48="] * 6, ["85", " 85\n", " 85\nmore", "85 is it", "850", ""],
                                 answer=["85"] * 6)
    assert out == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_think_answer_format():
    comps = ["<think>a</think><answer>b</answer>", "  <think>\nx\n</think>\n<answer> 5 </answer>\n",
             "<think>a</think>", "<answer>b</answer><think>a</think>",
             "<think></think><answer>b</answer>", "<think>a</think><answer>b</answer><answer>c</answer>",
             "hi <think>a</think><answer>b</answer>"]
    assert rewards.think_answer_format(["p"] * 7, comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_length_penalty():
    from lmpo.rewards.format_reward import make_length_penalty

    pen = make_length_penalty(max_len=100, soft_len=60)
    assert pen(["p"] * 4, ["a" * 60, "a" * 80, "a" * 100, "a" * 500]) == [0.0, -0.5, -1.0, -1.0]
    assert pen(["p"], ["short"], completion_ids=[[1] * 90]) == [-0.75]  # tokens when given
    assert rewards.length_penalty(["p"], ["x" * 10]) == [0.0]
    with pytest.raises(ValueError):
        make_length_penalty(max_len=10, soft_len=10)


def test_resolve_module_and_file(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text("def shout(prompts, completions, **kw):\n"
                                             "    return [float(c.isupper()) for c in completions]\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "r.py").write_text("def count(prompts, completions, **kw):\n    return [len(c) for c in completions]\n"
                              "NOT_CALLABLE = 3\n")
    monkeypatch.chdir(tmp_path)
    (name1, f1), (name2, f2) = resolve_reward_funcs(["my_rewards:shout", "sub/r.py:count"])
    assert (name1, name2) == ("shout", "count")
    assert f1([""], ["AB"]) == [1.0] and f2([""], ["abc"]) == [3]
    names = [n for n, _ in resolve_reward_funcs(["math_answer", "math_answer"])]
    assert names == ["math_answer", "math_answer_2"]
    with pytest.raises(RewardError, match="NOT_CALLABLE"):
        resolve_reward_funcs(["sub/r.py:NOT_CALLABLE"])
    with pytest.raises(RewardError, match="has no attribute 'nope'"):
        resolve_reward_funcs(["sub/r.py:nope"])
    with pytest.raises(RewardError, match="does not exist"):
        resolve_reward_funcs(["missing.py:f"])
    with pytest.raises(RewardError, match="cannot import module 'no_such_mod'"):
        resolve_reward_funcs(["no_such_mod:f"])


def test_unknown_name_did_you_mean():
    with pytest.raises(RewardError) as e:
        resolve_reward_funcs(["math_anwser"])
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert "'math_anwser'" in msg and "Did you mean 'math_answer'" in msg
    for name in BUILTINS:
        assert name in msg


def _const(value, name):
    def f(prompts, completions, **kw):
        return [value(i) if callable(value) else value for i in range(len(completions))]
    f.__name__ = name
    return f


def test_weighted_sum_none_and_metrics():
    a = _const(lambda i: float(i), "a")
    b = _const(lambda i: None if i == 1 else 10.0, "b")
    none = _const(None, "none")
    res = compute_rewards([("a", a), ("b", b), ("none", none)], [1.0, 0.5, 2.0],
                          ["p"] * 3, ["c"] * 3, {"answer": ["x", "y", "z"]})
    assert isinstance(res, RewardResult)
    assert res.rewards == [5.0, 1.0, 7.0]
    assert res.valid == [True, True, True]
    assert res.per_func["b"] == [10.0, None, 10.0]
    assert res.metrics["reward/a/mean"] == 1.0
    assert res.metrics["reward/b/mean"] == 10.0
    assert math.isnan(res.metrics["reward/none/mean"])
    assert res.metrics["reward/a/failures"] == 0
    assert {k for k in res.metrics if k.startswith("time/reward/")} == {"time/reward/a_s", "time/reward/b_s", "time/reward/none_s"}
    assert res.failures == []


def test_all_none_is_invalid():
    res = compute_rewards([("n", _const(None, "n"))], None, ["p"], ["c"], {})
    assert res.valid == [False] and math.isnan(res.rewards[0])


def test_nan_inf_and_junk_are_sample_failures():
    f = _const(lambda i: [1.0, math.nan, math.inf, "oops"][i], "f")
    g = _const(1.0, "g")
    res = compute_rewards([("f", f), ("g", g)], [1, 1], ["p"] * 4, ["c"] * 4, {})
    assert res.valid == [True, False, False, False]
    assert res.rewards[0] == 2.0 and all(math.isnan(r) for r in res.rewards[1:])
    assert res.metrics["reward/f/failures"] == 3 and res.metrics["reward/g/failures"] == 0
    assert len(res.failures) == 3 and "'f'" in res.failures[0] and "sample 1" in res.failures[0]


def test_raising_function_fails_the_batch_not_the_loop():
    def boom(prompts, completions, **kw):
        raise ZeroDivisionError("division by zero in my reward")

    res = compute_rewards([("boom", boom), ("g", _const(1.0, "g"))], None, ["p"] * 2, ["c"] * 2, {})
    assert res.valid == [False, False]
    assert res.metrics["reward/boom/failures"] == 2
    assert "boom" in res.failures[0] and "ZeroDivisionError" in res.failures[0]


def test_on_error_raise_names_function_sample_and_cause():
    f = _const(lambda i: [1.0, math.nan][i], "flaky")
    with pytest.raises(RewardError, match=r"'flaky' failed on sample 1.*nan"):
        compute_rewards([("flaky", f)], None, ["p"] * 2, ["c"] * 2, {}, how=CallPolicy(on_error="raise"))

    def boom(prompts, completions, **kw):
        raise KeyError("answer")

    with pytest.raises(RewardError, match=r"'boom' failed on sample 0.*KeyError") as e:
        compute_rewards([("boom", boom)], None, ["p"], ["c"], {}, how=CallPolicy(on_error="raise"))
    assert isinstance(e.value.__cause__, KeyError)


@pytest.mark.parametrize("on_error", ["skip", "raise"])
def test_wrong_shape_is_always_an_error(on_error):
    with pytest.raises(RewardError, match=r"'short' returned 2 values for 3 completions"):
        compute_rewards([("short", lambda prompts, completions, **k: [1.0, 1.0])], None, ["p"] * 3, ["c"] * 3, {},
                        how=CallPolicy(on_error=on_error))
    with pytest.raises(RewardError, match=r"'scalar' returned a float"):
        compute_rewards([("scalar", lambda prompts, completions, **k: 1.0)], None, ["p"], ["c"], {}, how=CallPolicy(on_error=on_error))


def test_bad_arguments():
    f = _const(1.0, "f")
    with pytest.raises(RewardError, match="2 reward weights for 1"):
        compute_rewards([("f", f)], [1, 2], ["p"], ["c"], {})
    with pytest.raises(RewardError, match="column 'answer' has 2 values for 1"):
        compute_rewards([("f", f)], None, ["p"], ["c"], {"answer": ["a", "b"]})
    with pytest.raises(RewardError, match="on_error"):
        compute_rewards([("f", f)], None, ["p"], ["c"], {}, how=CallPolicy(on_error="ignore"))


def test_functions_run_concurrently_and_get_columns():
    seen, barrier = [], threading.Barrier(3, timeout=120)

    def make(k):
        def f(prompts, completions, answer, **kw):
            barrier.wait()  # deadlocks (then BrokenBarrierError) unless all three run at once
            seen.append(answer)
            return [float(k)] * len(completions)
        f.__name__ = "f%d" % k
        return f

    res = compute_rewards([make(k) for k in range(3)], None, ["p"], ["c"], {"answer": ["42"]}, how=CallPolicy(max_workers=4))
    assert res.rewards == [3.0] and res.failures == []
    assert seen == [["42"]] * 3


def test_real_builtins_together():
    funcs = resolve_reward_funcs(["math_answer", "think_answer_format"])
    res = compute_rewards(funcs, [1.0, 0.2], ["q", "q"],
                          ["<think>3+4</think><answer>\\boxed{7}</answer>", "7?"], {"answer": ["7", "8"]})
    assert res.rewards == [pytest.approx(1.2), 0.0]
