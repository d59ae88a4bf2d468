"""No run ends in NaN or trains nothing while exiting 0: non-finite config numbers and meaningless
combinations are config errors; rewards non-finite in float32 are invalid samples; huge finite
rewards give finite advantages; non-finite steps are skipped and counted, K in a row stop the run
(exit 2) with the checkpoint from before; non-finite weights are never saved; NaN metrics are
written as "NaN", not null."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import read_jsonl, rl_config, rl_overrides, run_lmpo
from lmpo.config import ConfigError, load_config
from lmpo.rl.loop import train
from lmpo.rl.setup import resolve_algorithm
from lmpo.io.checkpoint import find_checkpoint

REWARDS = '''
def huge(prompts, completions, **kw):
    """+-3e38: finite in float32, but a group's sum overflows."""
    return [3e38 if i % 2 else -3e38 for i in range(len(completions))]


def too_big_on_odd_rows(prompts, completions, **kw):
    """1e39 (inf in float32) on odd rows, the completion length elsewhere."""
    return [1e39 if i % 2 else float(len(c)) for i, c in enumerate(completions)]
'''


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "rew.py"
    path.write_text(REWARDS)
    return path


def _weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


def _all_finite(state) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("override", ["learning_rate=nan", "temperature=nan", "beta=nan", "max_grad_norm=nan",
                                      "algo.eps_high=inf", "ppo.vf_coef=-inf", "top_p=nan", "algo.adv_eps=nan",
                                      "algo.gamma=nan", "weight_decay=inf"])
def test_non_finite_numbers_are_config_errors(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number"):
        load_config(None, [override])


def test_non_finite_reward_weight_is_a_config_error():
    with pytest.raises(ConfigError, match="reward_weights"):
        load_config(None, ["reward_weights=[.inf]"])


def test_nan_learning_rate_exits_2_naming_the_key(tiny_dir, tmp_path):
    r = run_lmpo(["train", *rl_overrides(tiny_dir, tmp_path / "o", learning_rate="nan")], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "'learning_rate' must be a finite number" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "rloo", "dapo", "gspo"])
def test_group_size_one_with_a_group_estimator_is_a_config_error(algorithm):
    with pytest.raises(ConfigError, match="'group_size' is 1"):
        rl_config("m", "o", algorithm=algorithm, group_size=1)
    resolve_algorithm(rl_config("m", "o", algorithm="reinforce_pp", group_size=1))   # batch-level: fine


def test_lora_with_reference_resets_is_refused():
    with pytest.raises(ConfigError, match="'lora_r' and 'iterative.ref_reset_steps'"):
        rl_config("m", "o", lora_r=4, beta=0.1, **{"iterative.ref_reset_steps": 2})
    rl_config("m", "o", lora_r=4, beta=0.0, **{"iterative.ref_reset_steps": 2})   # no reference: nothing refused


def test_dapo_overlong_buffer_fits_any_budget():
    for max_new, buffer in ((4, 0), (8, 1), (80, 16), (1000, 200)):
        assert resolve_algorithm(rl_config("m", "o", algorithm="dapo", max_new_tokens=max_new)).overlong_buffer == buffer
    with pytest.raises(ConfigError, match=r"'algo.overlong_buffer' \(16\) must be at most max_new_tokens \(8\)"):
        load_config(None, ["algorithm=dapo", "max_new_tokens=8", "algo.overlong_buffer=16"])


def test_rewards_infinite_in_float32_are_invalid_samples(tiny_dir, tmp_path, rewards_file):
    out = tmp_path / "o"
    cfg = rl_config(tiny_dir, out, max_steps=1, beta=0.0, reward_funcs=[f"{rewards_file}:too_big_on_odd_rows"])
    m = train(cfg)
    assert m["reward/invalid"] == 8                     # 16 samples, the 8 odd ones scored 1e39
    assert math.isfinite(m["reward/mean"]) and m["train/skipped_steps"] == 0
    assert _all_finite(_weights(out / "final"))


def test_huge_finite_rewards_give_finite_advantages(tiny_dir, tmp_path, rewards_file):
    """+-3e38 per group: float32 sums overflow; the statistics do not (A = +-sqrt(3)/2 here)."""
    from lmpo.rl import loop as rl
    from lmpo.rl.loop import start

    cfg = rl_config(tiny_dir, tmp_path / "o", beta=0.0, reward_funcs=[f"{rewards_file}:huge"])
    run = start(cfg)
    batch, stats = rl.collect(run, rl.Timer())
    rl.prepare(run, batch)
    assert stats["reward/invalid"] == 0 and stats["reward/mean"] == 0.0
    a = math.sqrt(3) / 2           # mean 0, unbiased std sqrt(4 r^2 / 3) = 2r / sqrt(3); eps negligible
    first = batch.adv[:4, 0]
    assert torch.allclose(first, torch.tensor([-a, a, -a, a]), atol=1e-6), first


def test_divergence_is_skipped_counted_and_stops_with_exit_2(tiny_dir, tmp_path, rewards_file):
    """Dr. GRPO (no std) on +-3e38 rewards without clipping: every loss overflows. Each step is
    skipped (train/skipped_steps), the second in a row stops the run with exit 2; the checkpoint
    holds the untouched, finite weights; no final/ is written."""
    out = tmp_path / "o"
    r = run_lmpo(["train", *rl_overrides(tiny_dir, out, algorithm="dr_grpo", beta=0.0, max_grad_norm="null",
                                         max_steps=5, max_skipped_steps=2,
                                         reward_funcs=[f"{rewards_file}:huge"])], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "diverged" in r.stderr and "max_skipped_steps" in r.stderr and "Traceback" not in r.stderr
    rows = read_jsonl(out / "metrics.jsonl")
    assert [row["train/skipped_steps"] for row in rows] == [1]
    assert rows[0]["loss"] in ("NaN", "Infinity", "-Infinity")           # written as a string, not null
    assert not (out / "final").exists()
    ckpt = _weights(find_checkpoint(out) / "policy")
    assert _all_finite(ckpt)
    start = _weights(tiny_dir)
    assert all(torch.equal(start[k], ckpt[k]) for k in start)          # every step was skipped
    assert json.loads((find_checkpoint(out) / "meta.json").read_text())["step"] == 1


def test_non_finite_weights_are_never_saved(tiny_dir, tmp_path, monkeypatch):
    """Weights poisoned during step 2: the step-1 checkpoint stays, nothing is written over it,
    no final/, and the run stops with DivergedError."""
    from lmpo.rl import loop as rl

    real_update = rl.update

    def poisoned(run, batch, t):
        out = real_update(run, batch, t)
        if run.counters.step == 1:
            with torch.no_grad():
                next(run.actor.model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(rl, "update", poisoned)
    out = tmp_path / "o"
    with pytest.raises(rl.DivergedError, match="NaN or inf"):
        rl.train(rl_config(tiny_dir, out, max_steps=3, save_steps=1, beta=0.0))
    assert json.loads((find_checkpoint(out) / "meta.json").read_text())["step"] == 1
    assert _all_finite(_weights(find_checkpoint(out) / "policy"))
    assert not (out / "final").exists()


def test_nan_metrics_are_strings_and_read_back_as_floats(tmp_path):
    from lmpo.io.logging import MetricsLogger, read_metrics

    log = MetricsLogger(tmp_path, progress=False)
    log.log(1, {"a": float("nan"), "b": float("inf"), "c": -float("inf"), "d": 1.5, "e": torch.tensor(float("nan"))})
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 1, "a": "NaN", "b": "Infinity", "c": "-Infinity", "d": 1.5, "e": "NaN"}
    back = read_metrics(tmp_path)[0]
    assert math.isnan(back["a"]) and back["b"] == math.inf and back["c"] == -math.inf and back["d"] == 1.5
