"""Every bad input gives one paragraph naming the culprit (key, file, row or function) and exit
status 2, never a traceback. Run through ``lmpo.cli.main`` in-process (the same code path as the
command; test_cli.py covers the subprocess)."""

from __future__ import annotations

import json

import pytest
from conftest import rl_overrides, write_jsonl

from lmpo.cli import main

REWARDS = '''
import math
def raises(prompts, completions, **kw):
    raise KeyError("no such column: solution")
def nan(prompts, completions, **kw):
    return [math.nan] + [1.0] * (len(completions) - 1)
def short(prompts, completions, **kw):
    return [1.0, 0.0, 1.0]
def scalar(prompts, completions, **kw):
    return 1.0
def none(prompts, completions, **kw):
    return [None] * len(completions)
def exits(prompts, completions, **kw):
    import sys
    sys.exit(0)
def hangs(prompts, completions, **kw):
    import time
    time.sleep(30)
def needs_solution(prompts, completions, solution, **kw):
    return [1.0] * len(completions)
def positional(p, c):
    return [1.0] * len(c)
NOT_A_FUNCTION = 3
'''


@pytest.fixture
def lmpo_train(sft_dir, tmp_path, capsys, monkeypatch):
    """Run ``lmpo train`` in-process from tmp_path; returns (exit status, stderr)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LMPO_DEBUG", raising=False)
    (tmp_path / "rewards.py").write_text(REWARDS)

    def run(*args, **overrides):
        argv = ["train", *rl_overrides(sft_dir, tmp_path / "out", **{"max_steps": 1, "log_samples": 0, "overwrite_output_dir": True,
                                                                  **overrides}),
                *args]
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        return code, err
    return run


def _one_paragraph(code, err, *needles):
    assert code == 2, err
    assert err.startswith("lmpo train: error: "), err
    assert "Traceback" not in err and "\n\n" not in err.strip(), err
    for n in needles:
        assert n in err, f"{n!r} not in: {err}"


def test_unknown_key(lmpo_train):
    _one_paragraph(*lmpo_train("algo.eps_hgih=0.3"), "'algo.eps_hgih'", "Did you mean 'algo.eps_high'?")


def test_bad_values(lmpo_train):
    _one_paragraph(*lmpo_train("group_size=many"), "'group_size' must be int, got 'many'")
    _one_paragraph(*lmpo_train("algorithm=grpx"), "'algorithm'", "grpo, ppo")
    _one_paragraph(*lmpo_train(reward_weights=[1, 2]), "'reward_weights' has 2 weights for 1 reward sources")


def test_fused_adamw_on_a_torch_without_the_kernel(lmpo_train, monkeypatch):
    """torch < 2.4 has no fused AdamW for CPU parameters: the error names the key, not a torch traceback."""
    import torch

    real = torch.optim.AdamW

    def adamw(params, fused=None, **kw):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    _one_paragraph(*lmpo_train(fused_adamw=True), "'fused_adamw'", "set fused_adamw=false")
    assert lmpo_train(fused_adamw=False)[0] == 0


def test_missing_dataset(lmpo_train, tmp_path):
    _one_paragraph(*lmpo_train(dataset=tmp_path / "nope.jsonl"), "nope.jsonl' does not exist")


def test_empty_dataset(lmpo_train, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    _one_paragraph(*lmpo_train(dataset=tmp_path / "empty.jsonl"), "empty.jsonl' is empty")


def test_dataset_without_prompt(lmpo_train, tmp_path):
    write_jsonl(tmp_path / "q.csv.jsonl", [{"question": "1+2=", "answer": "3"}])
    _one_paragraph(*lmpo_train(dataset=tmp_path / "q.csv.jsonl"), "q.csv.jsonl' row 0 has no 'prompt' column",
                   "'question'")


def test_prompt_longer_than_the_context(lmpo_train, tmp_path):
    # the test model's context is 64 tokens; max_new_tokens=4 leaves 60 for a prompt
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "1+" * 40 + "1=", "answer": "41"}]
    write_jsonl(tmp_path / "long.jsonl", rows)
    code, err = lmpo_train(dataset=tmp_path / "long.jsonl", prompts_per_step=2)
    _one_paragraph(code, err, "long.jsonl", "row 1", "83 tokens")  # 82 characters + <bos>


def test_missing_model(lmpo_train, tmp_path):
    code, err = lmpo_train(f"model={tmp_path / 'no_model'}")
    _one_paragraph(code, err, f"{tmp_path / 'no_model'}'")


def test_unknown_reward_function(lmpo_train):
    _one_paragraph(*lmpo_train(reward_funcs=["addition_exat"]), "'addition_exat'", "Did you mean 'addition_exact'")
    _one_paragraph(*lmpo_train(reward_funcs=["missing.py:f"]), "missing.py", "does not exist")
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:nope"]), "has no attribute 'nope'", "raises")
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:NOT_A_FUNCTION"]), "NOT_A_FUNCTION", "not a function")


def test_reward_function_raises(lmpo_train):
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:raises"], reward_errors="raise"), "'raises'", "KeyError",
                   "no such column: solution")


def test_reward_function_returns_nan(lmpo_train):
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:nan"], reward_errors="raise"), "'nan'", "sample 0", "nan")


def test_reward_function_wrong_length_or_type(lmpo_train):
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:short"]), "'short' returned 3 values for 16 completions")
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:scalar"]), "'scalar' returned a float")


def test_skipped_failures_do_not_stop_the_run(lmpo_train, tmp_path):
    with pytest.warns(UserWarning, match="reward failures"):
        code, err = lmpo_train(reward_funcs=["rewards.py:nan"])
    assert code == 0, err
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward/invalid"] == 1 and row["reward/nan/failures"] == 1


def test_a_source_failing_on_every_sample_stops_the_run(lmpo_train, tmp_path):
    code, err = lmpo_train(reward_funcs=["rewards.py:raises"], max_steps=5, reward_fail_steps=2)
    _one_paragraph(code, err, "'raises'", "every sample of 2 consecutive steps (steps 1-2)",
                   "KeyError: 'no such column: solution'", "reward_fail_steps (now 2", "reward_timeout_s")
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 1  # step 2 stopped it
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:none"], max_steps=5), "'none'",
                   "3 consecutive steps", "returned None for every sample", "answer")  # the default: 3


def test_a_source_failing_now_and_then_does_not_stop_the_run(lmpo_train, tmp_path):
    (tmp_path / "flaky.py").write_text("def every_other(prompts, completions, trainer_state, **kw):\n"
                                       "    if trainer_state.global_step % 2:\n        raise ValueError('odd step')\n"
                                       "    return [1.0] * len(completions)\n")
    with pytest.warns(UserWarning, match="reward failures"):
        code, err = lmpo_train(reward_funcs=["flaky.py:every_other"], max_steps=4, reward_fail_steps=2)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/invalid"] for r in rows] == [0, 16, 0, 16]


def test_sys_exit_and_hanging_rewards_are_reported(lmpo_train):
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:exits"], reward_fail_steps=1), "'exits'",
                   "SystemExit: the reward function called sys.exit(0)")
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:hangs"], reward_fail_steps=1, reward_timeout_s=0.2),
                   "'hangs'", "did not return within reward_timeout_s=0.2 s", "reward_timeout_s (now 0.2 s)")


def test_reward_signature_errors_name_the_missing_column(lmpo_train):
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:needs_solution"]), "'needs_solution'",
                   "needs the argument 'solution'", "the columns are: answer)")
    _one_paragraph(*lmpo_train(reward_funcs=["rewards.py:positional"]), "'positional'", "needs the argument 'p'")


def test_resume_without_checkpoint_starts_from_step_0(lmpo_train):
    code, err = lmpo_train("--resume")        # a scheduler relaunching a run that died before its first save
    assert code == 0 and "--resume: no checkpoint in" in err and "starting from step 0" in err, err


def test_sft_bad_dataset(tiny_dir, tmp_path, capsys):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    code = main(["sft", f"model={tiny_dir}", f"dataset={tmp_path / 'pairs.jsonl'}", f"output_dir={tmp_path / 'o'}",
                 "max_steps=1", "progress=false", "threads=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("lmpo sft: error: ") and "pairs.jsonl' row 0 has no 'completion'" in err
    assert "Traceback" not in err
