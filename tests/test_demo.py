"""The demo's stages (visible, rerun clean), the fair comparison's budgets, the learning-rate
schedule, PPO's critic warm-up and reuse of the sampler's log-probs, and the experiment trackers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import read_jsonl, rl_config

from lmpo.rl.loop import train
from lmpo.io.checkpoint import find_checkpoint


def test_demo_stages_are_visible_and_a_rerun_starts_anew(tmp_path, capfd, monkeypatch):
    """A micro demo in a directory holding a previous run's files: every stage prints its bar (GRPO
    and PPO, side by side in their subprocesses, with the live reward) and its elapsed time, no dependency
    warns, and the old files are gone (metrics.jsonl has this run's steps only)."""
    import lmpo.demo as demo

    out = tmp_path / "demo"
    for stage in ("sft", "rm", "grpo", "ppo"):
        (out / stage).mkdir(parents=True)
        (out / stage / "stale.txt").write_text("from the last run")
    (out / "grpo" / "metrics.jsonl").write_text('{"step": 99}\n' * 5)
    micro = dict(sft_steps=3, sft_stop=None, rm_steps=2, grpo_steps=2, ppo_steps=2, eval_steps=1)
    monkeypatch.setattr(demo, "QUICK", micro)
    monkeypatch.setattr(demo, "PPO", {**demo.PPO, "prompts_per_step": 8})   # twice GRPO's samples per step
    monkeypatch.setattr(demo, "GRPO", {**demo.GRPO, "prompts_per_step": 2, "group_size": 2})
    seen, real_rm = [], demo.train_reward_model

    def rm_after_ppo(cfg):                      # the reward model trains on the core PPO frees
        seen.append((out / "ppo" / "summary.json").exists())
        return real_rm(cfg)

    monkeypatch.setattr(demo, "train_reward_model", rm_after_ppo)
    assert demo.main(["--quick", "--output-dir", str(out), "--threads", "1"]) == 0
    assert seen == [True], "the reward model did not train once, after the PPO run had finished"
    cap = capfd.readouterr()
    err, said = cap.err, cap.out
    for stage in ("sft", "rm", "grpo", "ppo"):
        assert not (out / stage / "stale.txt").exists(), stage
    assert [r["step"] for r in read_jsonl(out / "grpo" / "metrics.jsonl")] == [1, 2]
    assert [r["step"] for r in read_jsonl(out / "ppo" / "metrics.jsonl")] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stage_seconds"]) == {"sft", "rl", "compare"}          # the RM trains within "rl"
    assert summary["rm_seconds"] > 0 and (out / "rm" / "metrics.json").exists()
    for name in ("grpo", "ppo", "rm"):
        assert f"{name}: 100%" in err, f"no {name} progress bar"
    assert "reward=" in err, "no live reward on the RL bars"
    for stage in ("sft", "rm", "rl", "compare"):
        assert f"== {stage}: " in said, f"no elapsed time for the {stage} stage"
    assert "Warning" not in err and "deprecated" not in err, err[-2000:]
    assert "Writing model shards" not in err and "Loading weights" not in err
    assert (out / "compare.png").stat().st_size > 0
    assert "equal samples" in summary["compare_table"]


def test_watcher_reads_only_complete_new_lines(tmp_path):
    """The progress bars' reader of a growing metrics.jsonl counts complete lines only (a line being
    written waits) and parses just the newest one."""
    from lmpo.compare import _Tail

    path = tmp_path / "metrics.jsonl"
    tail = _Tail(path)
    assert tail.read() is None and tail.lines == 0                # not written yet
    path.write_text('{"step": 1, "reward/mean": 0.25}\n{"step": 2, "reward/mean": 0.5}\n{"step": 3, "rew')
    assert tail.read() == {"step": 2, "reward/mean": 0.5} and tail.lines == 2
    with open(path, "a") as f:
        f.write('ard/mean": 0.75}\n')
    assert tail.read() == {"step": 3, "reward/mean": 0.75} and tail.lines == 3
    assert tail.read() is None and tail.lines == 3                # nothing new


def _row(name, per_step, step_s, evals):
    clock = [step_s * (i + 1) for i in range(evals[-1][0])]
    return {"algorithm": name, "samples_per_step": per_step, "clock_s": clock,
            "evals": [{"step": s, "samples": s * per_step, "train_s": clock[s - 1], "greedy": g, "sampled": g}
                      for s, g in evals]}


def test_budget_rows_read_each_curve_at_the_other_runs_budget():
    """GRPO: 10 steps of 0.1 s, PPO: 4 steps of 0.5 s, both 128 samples per step. At PPO's samples
    (512) GRPO is read at step 4; GRPO's whole run (1.0 s) is the shorter in time, so at equal
    training time PPO is read at step 2 (1.0 s)."""
    from lmpo.compare import budget_rows

    grpo = _row("grpo", 128, 0.1, [(2, 0.2), (4, 0.4), (6, 0.6), (8, 0.8), (10, 0.9)])
    ppo = _row("ppo", 128, 0.5, [(1, 0.1), (2, 0.3), (3, 0.5), (4, 0.7)])
    rows = {(b["algorithm"], b["budget"].split(" (")[0]): b for b in budget_rows([grpo, ppo])}
    assert rows[("grpo", "its own run")]["step"] == 10 and rows[("ppo", "its own run")]["step"] == 4
    assert rows[("grpo", "equal samples")]["step"] == 4 and rows[("grpo", "equal samples")]["greedy"] == 0.4
    assert ("ppo", "equal samples") not in rows                   # PPO's own run is the equal-samples row
    assert rows[("ppo", "equal training time")]["step"] == 2       # 1.0 s of PPO = 2 steps
    assert ("grpo", "equal training time") not in rows


def test_cosine_schedule_decays_to_zero(sft_dir, tmp_path):
    """lr_t = lr · ½(1 + cos(π t / T)) after the t-th of T = 4 optimizer steps."""
    cfg = rl_config(sft_dir, tmp_path / "cos", max_steps=4, learning_rate=1e-3, beta=0.0)
    cfg.lr_schedule = "cosine"
    train(cfg)
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "cos" / "metrics.jsonl")]
    assert lrs == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in (1, 2, 3, 4)], abs=1e-12)


def test_critic_warmup_holds_the_policy_and_trains_the_critic(sft_dir, tmp_path):
    from lmpo.models.load import load_causal_lm

    cfg = rl_config(sft_dir, tmp_path / "wu", algorithm="ppo", max_steps=2, beta=0.02, learning_rate=1e-3)
    cfg.ppo.critic_warmup_steps = 2
    train(cfg)
    before, after = load_causal_lm(str(sft_dir)).state_dict(), load_causal_lm(str(tmp_path / "wu" / "final")).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the policy moved during the critic warm-up"
    rows = read_jsonl(tmp_path / "wu" / "metrics.jsonl")
    assert rows[1]["critic/loss"] != rows[0]["critic/loss"]


@pytest.mark.parametrize("top_p, policy_forwards", [(1.0, 0), (0.9, 1)])
def test_ppo_single_update_takes_old_logp_from_the_sampler(sft_dir, tmp_path, monkeypatch, top_p, policy_forwards):
    """With one update per rollout and KL in the reward, π_old's log-probs are the sampler's (same
    weights, full distribution): no policy forward before the update. Under top-p the sampler's
    distribution is not π_old's, so they are recomputed."""
    import lmpo.rl.loop as rl

    calls = []
    real = rl.logp_of
    monkeypatch.setattr(rl, "logp_of",
                        lambda run, model, batch: calls.append(model is run.actor.model) or real(run, model, batch))
    cfg = rl_config(sft_dir, tmp_path / "p", algorithm="ppo", max_steps=1, beta=0.02, top_p=top_p)
    train(cfg)
    assert calls.count(True) == policy_forwards and calls.count(False) == 1    # the reference: once


def test_report_to_wandb_offline(sft_dir, tmp_path, monkeypatch):
    """report_to=[wandb] writes an offline run under output_dir/wandb holding the step metrics."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = rl_config(sft_dir, tmp_path / "w", max_steps=2, beta=0.0, report_to=["wandb"])
    train(cfg)
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert b"reward/mean" in data and b"time/step_s" in data


def test_report_to_mlflow_local(sft_dir, tmp_path, monkeypatch):
    """report_to=[mlflow] logs every step's metrics to the file store output_dir/mlruns."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = rl_config(sft_dir, tmp_path / "m", max_steps=2, beta=0.0, report_to=["mlflow"])
    train(cfg)
    files = list((tmp_path / "m" / "mlruns").glob("*/*/metrics/reward/mean"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 2


def test_report_to_names_unknown_and_missing_trackers(tmp_path):
    from lmpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="report_to.*'comet'.*allowed: tensorboard, wandb, mlflow, trackio"):
        load_config(None, ["report_to=[comet]"])
    import importlib.util

    missing = [n for n in ("trackio", "mlflow", "wandb") if importlib.util.find_spec(n) is None]
    if not missing:
        pytest.skip("every tracker is installed")
    with pytest.raises(ConfigError, match=rf"pip install 'lmpo\[{missing[0]}\]'"):
        load_config(None, [f"report_to=[{missing[0]}]"])


@pytest.mark.parametrize("epochs, forwards", [(1, 1), (2, 3)])
def test_ppo_critic_forward_runs_once_with_one_update(sft_dir, tmp_path, monkeypatch, epochs, forwards):
    """One update per rollout: the critic's values before the update are the loss's values, so the
    critic runs once per step (kept with its graph); with 2 epochs it runs before and in each epoch.
    The critic still learns through the kept graph: its scalar head, zero at the start, has moved."""
    import lmpo.rl.critic as critic_module

    calls = []
    real = critic_module.token_values
    monkeypatch.setattr(critic_module, "token_values", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = rl_config(sft_dir, tmp_path / "c", algorithm="ppo", max_steps=3, beta=0.02, epochs=epochs,
                    learning_rate=1e-3)
    train(cfg)
    assert len(calls) == 3 * forwards
    from lmpo.models.value import load_value_model, scalar_head

    critic = load_value_model(str(find_checkpoint(tmp_path / "c") / "critic"), from_reward_model=True)
    assert scalar_head(critic).weight.abs().sum() > 0


def test_compare_cli_with_per_algorithm_keys(sft_dir, tmp_path):
    """`lmpo compare` with ALGO:key=value for one run only: both runs share the rest, the report has
    the equal-budget table and the plot; a bad per-run key is exit 2 naming it."""
    import yaml
    from conftest import rl_overrides, run_lmpo as lmpo

    out = tmp_path / "cmp"
    shared = [o for o in rl_overrides(sft_dir, out / "x", max_steps=2, eval_steps=1, beta=0.0)
              if not o.startswith("output_dir=")]
    res = lmpo(["compare", *shared, "ppo:group_size=1", "ppo:prompts_per_step=8", "--output-dir", str(out)], cwd=tmp_path, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    grpo, ppo = (yaml.safe_load((out / f"{n}.yaml").read_text()) for n in ("grpo", "ppo"))
    assert (grpo["group_size"], grpo["prompts_per_step"]) == (4, 4)
    assert (ppo["group_size"], ppo["prompts_per_step"], ppo["max_steps"]) == (1, 8, 2)
    md = (out / "compare.md").read_text()
    assert "equal samples" in md and "| ppo | its own run | 2 | 16 |" in md
    assert (out / "compare.png").stat().st_size > 0
    bad = lmpo(["compare", *shared, "ppo:group_sise=1", "--output-dir", str(tmp_path / "bad")], cwd=tmp_path)
    assert bad.returncode == 2 and "group_sise" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("passes", [{}, {"epochs": 2, "minibatches": 2, "max_steps": 1}], ids=["one-update", "2x2"])
def test_ppo_critic_graph_is_freed_before_the_policy_forward(sft_dir, tmp_path, monkeypatch, passes):
    """A separate critic's value loss is back-propagated before the policy's forward in the update
    (``Critic.add_value_loss``), so the two graphs are never held at once (peak memory): when the
    policy's forward runs, the critic already has its gradients. With one update per rollout the
    loss goes through the graph ``prepare`` kept, which is gone by then; otherwise through the
    critic's own forward."""
    import lmpo.rl.loop as loop

    seen = []
    real = loop.completion_logp

    def spy(model, mb, *a, **k):
        if torch.is_grad_enabled():                                       # the update's policy forward
            run = spy.run
            seen.append(all(p.grad is not None for p in run.critic.parameters() if p.requires_grad))
            if mb.values_live is not None:
                with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                    mb.values_live.sum().backward()
        return real(model, mb, *a, **k)

    real_setup = loop.setup
    monkeypatch.setattr(loop, "setup", lambda *a, **k: setattr(spy, "run", real_setup(*a, **k)) or spy.run)
    monkeypatch.setattr(loop, "completion_logp", spy)
    settings = {"max_steps": 2, **passes}
    train(rl_config(sft_dir, tmp_path / "c", algorithm="ppo", beta=0.02, learning_rate=1e-3, **settings))
    assert seen == [True] * (2 if not passes else 4)

