"""Monitors: the signals by hand, the alarm rules (threshold, patience, warmup, stop), the one-line
state, no effect on training numerics, and on the embedded-style model a deliberately exploitable
reward (it prefers longer answers) raising an alarm within a bounded number of steps, exit 2 and a
checkpoint, while the honest reward under the same settings raises none."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import read_jsonl, rl_config, rl_overrides, run_lmpo
from lmpo.config import ConfigError, MonitorConfig, load_config
from lmpo.rollout import RolloutBatch
from lmpo.rl.monitors import MonitorAlarm, Monitors, distinct_fraction, group_similarity, monitor_line, probe_kl
from lmpo.rl.setup import Counters
from lmpo.io.checkpoint import find_checkpoint


def test_signals_by_hand():
    assert distinct_fraction(["a", "a", "b", "c"], 2) == 0.75
    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 4, 0], [5, 6, 0, 0], [5, 6, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0]])
    # group 1: {(1,2),(2,3)} vs {(1,2),(2,4)} -> 1/3; group 2: padding ignored, identical -> 1
    assert group_similarity(ids, mask, 2) == pytest.approx((1 / 3 + 1) / 2)
    start = torch.tensor([[-1.0, -2.0, -3.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert probe_kl(start, start, m) == 0.0
    now = start + torch.tensor([[math.log(2), 0.0, 5.0]])          # ρ = 2 on token 0, masked token ignored
    assert probe_kl(now, start, m) == pytest.approx((2 - 1 - math.log(2)) / 2)


def _batch(completions, G, lengths):
    n = len(completions)
    T = max(lengths)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    return RolloutBatch(prompt_ids=torch.ones(n, 2, dtype=torch.long), prompt_mask=torch.ones(n, 2, dtype=torch.long),
                        completion_ids=torch.arange(n * T).view(n, T) % 7, mask=mask, sampler_logp=torch.zeros(n, T),
                        truncated=torch.zeros(n, dtype=torch.bool), group_size=G, prompts=["p"] * n,
                        completions=completions, rows=[{"prompt": "p"}] * n)


class _Run:
    def __init__(self):
        self.counters = Counters()


def _monitor(tmp_path, **kw):
    cfg = MonitorConfig(warmup_steps=0, window=3, patience=2, kl_every=10 ** 6, **kw)
    return Monitors(cfg, group_size=2, output_dir=tmp_path, state={}), _Run()


def _step(mon, run, batch, **metrics):
    run.counters.step += 1
    m = {"entropy": 0.5, "frac_zero_std_groups": 0.0, "reward/mean": 0.5, "reward/std": 0.5,
         "completion/mean_length": 3.0, "completion/truncated_frac": 0.0, **metrics}
    mon.watch(run, batch, m)
    return m


def test_a_rule_fires_after_patience_once_and_stop_raises(tmp_path):
    mon, run = _monitor(tmp_path, action="stop")
    diverse = _batch(["1", "2", "3", "4"], 2, [2, 2, 2, 2])
    same = _batch(["1", "1", "3", "3"], 2, [2, 2, 2, 2])
    for b in (same, diverse, same):             # one step below threshold, then an interruption: no alarm
        m = _step(mon, run, b, entropy=0.001 if b is same else 0.5)
        assert m["monitor/alarms"] == 0
        mon.enforce()
    m = _step(mon, run, same)                   # distinct 0.5 twice in a row is fine (threshold 0.13) ...
    m = _step(mon, run, same, entropy=0.001)
    m = _step(mon, run, same, entropy=0.001)    # ... entropy 0.001 < 0.02 for 2 steps: alarm
    assert m["monitor/entropy"] == 0.001 and m["monitor/alarms"] == 1
    with pytest.raises(MonitorAlarm, match="collapse: entropy"):
        mon.enforce()
    _step(mon, run, same, entropy=0.001)
    mon.enforce()                               # an alarm fires once
    alarms = read_jsonl(tmp_path / "alarms.jsonl")
    assert [a["rule"] for a in alarms] == ["entropy"] and alarms[0]["kind"] == "collapse"


def test_trend_rules_length_truncation_divergence_components(tmp_path):
    mon, run = _monitor(tmp_path, verifier=None)
    b = _batch(["1", "2", "3", "4"], 2, [2, 2, 2, 2])
    for _ in range(3):
        _step(mon, run, b, **{"reward/f/mean": 0.8, "reward/g/mean": 0.1})
    for _ in range(4):                          # length ×3, everything truncated, f falls while the total rises
        m = _step(mon, run, b, **{"completion/mean_length": 9.0, "completion/truncated_frac": 1.0,
                                  "reward/mean": 0.9, "reward/f/mean": 0.3, "reward/g/mean": 0.9})
    assert m["monitor/length_ratio"] == pytest.approx(3.0)
    assert m["monitor/component_drop/f"] == pytest.approx(0.5)
    assert m["monitor/component_drop/g"] == pytest.approx(-0.8)
    fired = {a["rule"] for a in read_jsonl(tmp_path / "alarms.jsonl")}
    assert fired == {"length_ratio", "truncated_frac", "component_drop/f"}


def test_eval_drop_needs_the_training_reward_to_hold(tmp_path):
    mon, run = _monitor(tmp_path)
    b = _batch(["1", "2", "3", "4"], 2, [2, 2, 2, 2])
    for acc, reward in [(0.6, 0.5), (0.4, 0.3), (0.4, 0.3)]:      # eval fell, but so did the training reward
        _step(mon, run, b, **{"eval/greedy_accuracy": acc, "reward/mean": reward})
    assert not (tmp_path / "alarms.jsonl").exists()
    for acc, reward in [(0.4, 0.9), (0.4, 0.9)]:                  # the training reward is back up, eval is not
        m = _step(mon, run, b, **{"eval/greedy_accuracy": acc, "reward/mean": reward})
    assert m["monitor/eval_drop"] == pytest.approx(0.2)
    assert [a["rule"] for a in read_jsonl(tmp_path / "alarms.jsonl")] == ["eval_drop"]


def test_monitor_line(tmp_path):
    rows = [{"step": 1, "monitor/distinct_frac": 0.5, "monitor/kl_start": 0.1},
            {"step": 2, "monitor/distinct_frac": 0.25, "monitor/alarms": 0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = monitor_line(tmp_path)
    assert line.startswith("monitors ok over 2 steps") and "distinct 0.25" in line and "KL(start) 0.10" in line
    (tmp_path / "alarms.jsonl").write_text(json.dumps({"step": 2, "rule": "kl_start", "value": 3.0}) + "\n")
    assert monitor_line(tmp_path).startswith("monitors: 1 ALARM (kl_start 3 @ 2)")
    assert "\n" not in monitor_line(tmp_path)


def test_bad_monitor_settings_name_the_key():
    with pytest.raises(ConfigError, match="monitor.window"):
        load_config(None, ["monitor.window=0"])
    with pytest.raises(ConfigError, match="monitor.action"):
        load_config(None, ["monitor.action=explode"])


def test_monitors_do_not_change_training(sft_dir, tmp_path):
    from lmpo.rl.loop import train
    from lmpo.models.load import load_causal_lm

    for on in (True, False):
        train(rl_config(sft_dir, tmp_path / str(on), max_steps=3, **{"monitor.enabled": on, "monitor.kl_every": 1}))
    a = load_causal_lm(str(tmp_path / "True" / "final")).state_dict()
    b = load_causal_lm(str(tmp_path / "False" / "final")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = read_jsonl(tmp_path / "True" / "metrics.jsonl")
    assert rows[-1]["monitor/kl_start"] > 0 and "monitor/distinct_frac" in rows[0]
    assert not any(k.startswith("monitor/") for k in read_jsonl(tmp_path / "False" / "metrics.jsonl")[0])


LONGER = '''
def longer(prompts, completions, **kw):
    """Deliberately exploitable: a longer answer scores higher, right or wrong."""
    return [len(c) / 6 for c in completions]
'''
WATCH = dict(group_size=8, prompts_per_step=4, max_new_tokens=6, learning_rate=1e-3, beta=0, save_steps=1000,
             **{"monitor.verifier": "addition_exact", "monitor.action": "stop", "monitor.warmup_steps": 5,
                "monitor.window": 5, "monitor.patience": 3})


def test_exploitable_reward_raises_an_alarm_and_the_honest_one_does_not(sft_dir, tmp_path):
    from lmpo.rl.loop import train

    (tmp_path / "longer.py").write_text(LONGER)
    bound = 40
    proc = run_lmpo(["train", *rl_overrides(sft_dir, tmp_path / "hack", max_steps=bound, reward_funcs=["longer.py:longer"],
                                            **WATCH)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "monitor alarm" in proc.stderr and "Traceback" not in proc.stderr
    alarms = read_jsonl(tmp_path / "hack" / "alarms.jsonl")
    steps = len(read_jsonl(tmp_path / "hack" / "metrics.jsonl"))
    assert steps < bound and alarms[0]["step"] == steps
    assert {a["kind"] for a in alarms} <= {"drift", "hacking"}
    assert find_checkpoint(tmp_path / "hack") is not None
    train(rl_config(sft_dir, tmp_path / "honest", max_steps=bound, reward_funcs=["addition_exact"], **WATCH))
    assert not (tmp_path / "honest" / "alarms.jsonl").exists()
    last = read_jsonl(tmp_path / "honest" / "metrics.jsonl")[-1]
    assert last["monitor/alarms"] == 0 and last["monitor/reward_divergence"] == pytest.approx(0.0, abs=1e-5)
