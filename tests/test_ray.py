"""The Ray backend on a local CPU cluster: 2 rollout workers, reward workers and the learner as
actors. Synchronous runs equal the single-process run; asynchronous runs keep staleness within the
bound; a killed rollout worker is restarted (or the run stops with a clear error and a checkpoint)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import rl_config, rl_overrides, run_lmpo

ray = pytest.importorskip("ray")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()


def test_ray_sync_equals_one_process(sft_dir, tmp_path):
    """Two rollout workers and two reward workers give the single-process run's samples, rewards
    and weights (the per-group seeds make a group's samples independent of the worker)."""
    from lmpo.train.rl import train

    kw = dict(beta=0.0, max_steps=2, prompts_per_step=4, group_size=4, max_new_tokens=5, eval_samples=4)
    train(rl_config(sft_dir, tmp_path / "one", **kw))
    train(rl_config(sft_dir, tmp_path / "ray", **kw, **{"distributed.backend": "ray", "distributed.rollout_workers": 2,
                                                        "distributed.reward_workers": 2}))
    one, par = _metrics(tmp_path / "one"), _metrics(tmp_path / "ray")
    assert [m["reward/mean"] for m in one] == [m["reward/mean"] for m in par]
    assert [m["completion/mean_length"] for m in one] == [m["completion/mean_length"] for m in par]
    assert any(m["grad_norm"] > 0 for m in one)                      # the weights did move
    a, b = _weights(tmp_path / "one" / "final"), _weights(tmp_path / "ray" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    pids = json.loads((tmp_path / "ray" / "ray_workers.json").read_text())
    assert len(pids["rollout"]) == 2 and len(pids["reward"]) == 2
    assert len({pids["learner"], *pids["rollout"], *pids["reward"]}) == 5   # five separate processes


def test_ray_async_staleness_is_bounded(sft_dir, tmp_path):
    """max_staleness=1: every batch comes from weights at most one update old, the lag is measured
    per row, and the truncated importance weights correct it."""
    from lmpo.train.rl import train

    out = tmp_path / "async"
    train(rl_config(sft_dir, out, beta=0.0, max_steps=5, prompts_per_step=4, group_size=4, eval_samples=4,
                    **{"distributed.backend": "ray", "distributed.max_staleness": 1}))
    ms = _metrics(out)
    assert len(ms) == 5
    assert all(m["async/staleness_max"] <= 1 for m in ms)
    assert any(m["async/staleness_max"] == 1 for m in ms)           # it did run ahead of the learner
    assert all("tis/weight_mean" in m for m in ms)                   # algo.tis_cap turned on (2.0)
    assert json.loads((out / "config.json").read_text())["distributed"]["max_staleness"] == 1


def test_ray_config_errors(tiny_dir, tmp_path):
    from lmpo.config import ConfigError
    from lmpo.train.rl import train

    with pytest.raises(ConfigError, match="distributed.strategy"):
        train(rl_config(tiny_dir, tmp_path / "a", **{"distributed.backend": "ray", "distributed.strategy": "ddp"}))
    with pytest.raises(ConfigError, match="distributed.max_staleness"):
        train(rl_config(tiny_dir, tmp_path / "b", **{"distributed.max_staleness": 2}))


def _kill_rollout_worker_after(out: Path, step: int, done: dict):
    """In a thread: once ``step`` steps are logged, SIGKILL rollout worker 0 (its pid from
    ray_workers.json)."""
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline:
        try:
            if len((out / "metrics.jsonl").read_text().splitlines()) >= step:
                pid = json.loads((out / "ray_workers.json").read_text())["rollout"][0]
                os.kill(pid, signal.SIGKILL)
                done["pid"], done["at"] = pid, len((out / "metrics.jsonl").read_text().splitlines())
                return
        except (FileNotFoundError, json.JSONDecodeError, ProcessLookupError):
            pass
        time.sleep(0.02)


def _ray_run(tiny_dir, out, steps, restarts, extra=()):
    args = ["train", *rl_overrides(tiny_dir, out, beta=0.0, max_steps=steps, save_steps=5, eval_samples=2,
                                   **{"distributed.backend": "ray", "distributed.worker_restarts": restarts,
                                      "distributed.ray_timeout_s": 60}), *extra]
    return args


def _run_and_kill(tiny_dir, tmp_path, steps, restarts, kill_after):
    """``lmpo train`` on Ray for ``steps`` steps; rollout worker 0 is SIGKILLed after ``kill_after``."""
    out = tmp_path / "run"
    done: dict = {}
    killer = threading.Thread(target=_kill_rollout_worker_after, args=(out, kill_after, done), daemon=True)
    killer.start()
    r = run_lmpo(_ray_run(tiny_dir, out, steps, restarts=restarts), tmp_path, timeout=240)
    killer.join(timeout=5)
    assert "pid" in done and done["at"] < steps, "the worker was not killed mid-run"
    return out, r, done


def test_killed_rollout_worker_is_restarted(tiny_dir, tmp_path):
    out, r, _ = _run_and_kill(tiny_dir, tmp_path, 120, restarts=1, kill_after=3)
    assert r.returncode == 0, r.stderr[-3000:]
    ms = _metrics(out)
    assert [m["step"] for m in ms] == list(range(1, 121))            # no step lost
    assert ms[-1]["ray/worker_restarts"] >= 1
    assert (out / "final" / "config.json").exists()


def test_killed_worker_past_restarts_stops_with_checkpoint_and_resumes(tiny_dir, tmp_path):
    out, r, done = _run_and_kill(tiny_dir, tmp_path, 400, restarts=0, kill_after=6)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "rollout worker 0" in r.stderr and "--resume" in r.stderr and "worker_restarts" in r.stderr
    meta = json.loads((out / "checkpoint" / "meta.json").read_text())
    stopped = meta["step"]
    assert done["at"] <= stopped < 400                               # saved at the crash, not only every 5 steps
    r2 = run_lmpo([*_ray_run(tiny_dir, out, stopped + 2, restarts=1), "--resume"], tmp_path, timeout=240)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)][-2:] == [stopped + 1, stopped + 2]


def test_scale_out_examples_are_valid_configs():
    from conftest import REPO

    from lmpo.config import load_config
    from lmpo.train.setup import resolve_algorithm

    ray_cfg = load_config(str(REPO / "examples" / "addition_ray_async.yaml"), [])   # load_config runs the Ray checks
    assert ray_cfg.distributed.backend == "ray"
    assert ray_cfg.distributed.max_staleness == 1 and resolve_algorithm(ray_cfg).tis_cap == 2.0
    vllm_cfg = load_config(str(REPO / "examples" / "gsm8k_qwen_vllm.yaml"), [])
    assert vllm_cfg.rollout.engine == "vllm" and resolve_algorithm(vllm_cfg).tis_cap == 2.0
    # with another engine and no tis_cap in the config, the loop still turns TIS on
    assert resolve_algorithm(load_config(None, ["rollout.engine=vllm"])).tis_cap == 2.0
    assert resolve_algorithm(load_config(None, [])).tis_cap is None
