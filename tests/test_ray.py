"""The Ray backend on a local CPU cluster: rollout workers, reward workers and the learner as
actors. Synchronous runs equal the single-process run; asynchronous runs keep staleness within the
bound; a killed rollout worker is restarted (or the run stops with a clear error and a checkpoint).

Starting a Ray cluster and a Python process per actor is what costs here (seconds each on a quiet
machine, minutes on a loaded one), so the module starts one local cluster that every run joins, the
runs are in this process where the test does not need a process of its own, and each run has only
the actors its test is about. Every wait is for an event (a step logged, a worker answering)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import rl_config, rl_overrides

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    """One local Ray cluster for the module; yields its address for runs in other processes. The
    in-process runs find it initialized and leave it running. Its workers get this process's
    environment, with the repository importable and one thread each."""
    from conftest import REPO

    assert not ray.is_initialized()
    old = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), old["PYTHONPATH"]]))
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ray.init(num_cpus=5, include_dashboard=False, logging_level="WARNING",      # 5: the most actors of any run here
                 _system_config={"worker_niceness": 0})                            # as lmpo's own local cluster
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(model_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()


def test_ray_sync_equals_one_process(sft_dir, tmp_path):
    """Two rollout workers and two reward workers give the single-process run's samples, rewards
    and weights (the per-group seeds make a group's samples independent of the worker)."""
    from lmpo.launch import train

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
    from lmpo.launch import train

    out = tmp_path / "async"
    train(rl_config(sft_dir, out, beta=0.0, max_steps=5, prompts_per_step=4, group_size=4, eval_samples=4,
                    **{"distributed.backend": "ray", "distributed.max_staleness": 1, "distributed.rollout_workers": 1}))
    ms = _metrics(out)
    assert len(ms) == 5
    assert all(m["async/staleness_max"] <= 1 for m in ms)
    assert any(m["async/staleness_max"] == 1 for m in ms)           # it did run ahead of the learner
    assert all("tis/weight_mean" in m for m in ms)                   # algo.tis_cap turned on (2.0)
    assert json.loads((out / "config.json").read_text())["distributed"]["max_staleness"] == 1


def test_ray_config_errors(tiny_dir, tmp_path):
    from lmpo.config import ConfigError
    from lmpo.launch import train

    with pytest.raises(ConfigError, match="distributed.strategy"):
        train(rl_config(tiny_dir, tmp_path / "a", **{"distributed.backend": "ray", "distributed.strategy": "ddp"}))
    with pytest.raises(ConfigError, match="distributed.max_staleness"):
        train(rl_config(tiny_dir, tmp_path / "b", **{"distributed.max_staleness": 2}))


# The reward function, in the reward worker, SIGKILLs rollout worker 0 while scoring step AT (once:
# a marker file remembers it). Event-driven: the kill lands at that step however slow the machine.
KILLER = """
import json, os, signal
CALLS = {{}}

def kill_worker_at(prompts, completions, **kw):
    pid = os.getpid()
    CALLS[pid] = n = CALLS.get(pid, 0) + 1
    marker = os.path.join({out!r}, "killed_rollout_worker")
    if n == {at} and not os.path.exists(marker):
        victim = json.load(open(os.path.join({out!r}, "ray_workers.json")))["rollout"][0]
        os.kill(victim, signal.SIGKILL)
        open(marker, "w").write(str(victim))
    return [float(c.strip()[:1] == "1") for c in completions]
"""


def _ray_args(tiny_dir, tmp_path, out, steps, restarts, kill_at):
    """``lmpo train`` arguments: one rollout worker (the one killed) and one reward worker (the killer)."""
    (tmp_path / "killer.py").write_text(KILLER.format(out=str(out), at=kill_at))
    return ["train", *rl_overrides(tiny_dir, out, beta=0.0, max_steps=steps, save_steps=50, eval_samples=2,
                                   reward_funcs=[f"{tmp_path / 'killer.py'}:kill_worker_at"],
                                   **{"distributed.backend": "ray", "distributed.worker_restarts": restarts,
                                      "distributed.rollout_workers": 1, "distributed.reward_workers": 1})]


def _lmpo(args, capsys) -> tuple[int, str]:
    """``lmpo ARGS`` in this process (the module's Ray cluster is joined, not started): exit status, stderr."""
    from lmpo.cli import main

    capsys.readouterr()
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err


def test_killed_rollout_worker_is_restarted(tiny_dir, tmp_path, capsys):
    """Killed while step 2 is scored, the worker is restarted and step 3's rollout is resubmitted to
    it: every step is logged once and the run finishes."""
    out = tmp_path / "run"
    code, err = _lmpo(_ray_args(tiny_dir, tmp_path, out, 4, restarts=1, kill_at=2), capsys)
    assert code == 0, err[-3000:]
    assert (out / "killed_rollout_worker").exists()
    ms = _metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3, 4]                   # no step lost
    assert [m["ray/worker_restarts"] for m in ms] == [0, 0, 1, 1]    # restarted once, after step 2
    assert (out / "final" / "config.json").exists()


def test_killed_worker_past_restarts_stops_with_checkpoint_and_resumes(tiny_dir, tmp_path, capsys):
    """Killed during step 3, the worker fails step 4's rollout: the run stops with exit 2 and a
    checkpoint of step 3 (the last whole step, not only every save_steps), and resumes from it."""
    from lmpo.io.checkpoint import find_checkpoint

    out = tmp_path / "run"
    code, err = _lmpo(_ray_args(tiny_dir, tmp_path, out, 50, restarts=0, kill_at=3), capsys)
    assert code == 2, err[-3000:]
    assert "rollout worker 0" in err and "--resume" in err and "worker_restarts" in err
    assert json.loads((find_checkpoint(out) / "meta.json").read_text())["step"] == 3
    code, err = _lmpo([*_ray_args(tiny_dir, tmp_path, out, 5, restarts=1, kill_at=3), "--resume"], capsys)
    assert code == 0, err[-3000:]
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5]     # each step once


def test_sigterm_to_the_driver_stops_the_learner_after_a_step_with_a_checkpoint(tiny_dir, tmp_path):
    """A scheduler's SIGTERM to ``lmpo train`` (the Ray driver) reaches the learner actor, which
    finishes its step, saves it and stops: exit 143, every logged step in the checkpoint. This run
    starts its own local cluster, as a user's does, whose workers run at the driver's priority (not
    Ray's default nice 15, which starves them on a busy machine)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    from lmpo.io.checkpoint import find_checkpoint

    out = tmp_path / "run"
    args = rl_overrides(tiny_dir, out, beta=0.0, max_steps=100_000, save_steps=100_000, eval_samples=2,
                        **{"distributed.backend": "ray", "distributed.rollout_workers": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmpo", "train", *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900                    # generous: Ray starts slowly on a loaded machine
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
            time.sleep(0.1)
        pids = json.loads((out / "ray_workers.json").read_text())
        nice = {os.getpriority(os.PRIO_PROCESS, p) for p in (pids["learner"], *pids["rollout"], *pids["reward"])}
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=900)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM" in err and "--resume" in err
    step = json.loads((find_checkpoint(out) / "meta.json").read_text())["step"]
    assert [m["step"] for m in _metrics(out)] == list(range(1, step + 1))
    assert nice == {os.getpriority(os.PRIO_PROCESS, 0)}


def test_scale_out_examples_are_valid_configs():
    from conftest import REPO

    from lmpo.config import load_config
    from lmpo.rl.setup import resolve_algorithm

    ray_cfg = load_config(str(REPO / "examples" / "addition_ray_async.yaml"), [])   # load_config runs the Ray checks
    assert ray_cfg.distributed.backend == "ray"
    assert ray_cfg.distributed.max_staleness == 1 and resolve_algorithm(ray_cfg).tis_cap == 2.0
    vllm_cfg = load_config(str(REPO / "examples" / "gsm8k_qwen_vllm.yaml"), [])
    assert vllm_cfg.rollout.engine == "vllm" and resolve_algorithm(vllm_cfg).tis_cap == 2.0
    # with another engine and no tis_cap in the config, the loop still turns TIS on
    assert resolve_algorithm(load_config(None, ["rollout.engine=vllm"])).tis_cap == 2.0
    assert resolve_algorithm(load_config(None, [])).tis_cap is None
