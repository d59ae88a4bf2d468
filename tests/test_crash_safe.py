"""Crash-safe runs: a SIGKILL at any point of a checkpoint save, SIGINT / SIGTERM at any step, a full
disk, a second run into the same directory, an unusable output_dir. Every interrupted run resumes
to the straight run's weights bit for bit and to its metrics rows, each step exactly once.

The runs are 3 steps of the random tiny model with a reward that varies (the fraction of digits),
so the weights move. Interrupted runs are forked from the test process (no interpreter start-up);
the fork SIGKILLs itself at the named save point (``LMPO_FAULT_POINT``) or its reward function sends
it the signal at a given step, so nothing depends on timing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from conftest import read_jsonl, rl_config, write_jsonl

from lmpo.io.checkpoint import LATEST, find_checkpoint
from lmpo.rl.loop import train
from lmpo.io.rundir import OutputError, locked

# The reward: digits in the completion. LMPO_TEST_SIGNAL=SIG@STEP[xN] makes the process send itself
# SIG (N times) while scoring step STEP; LMPO_TEST_FILL=PATH@STEP fills PATH's disk at that step.
REWARD = '''
import os, signal, time
CALLS = {}

def digits(prompts, completions, **kw):
    pid = os.getpid()
    CALLS[pid] = step = CALLS.get(pid, 0) + 1
    sig = os.environ.get("LMPO_TEST_SIGNAL")
    if sig:
        what, _, times = sig.partition("x")
        num, at = map(int, what.split("@"))
        if step == at:
            for k in range(int(times or 1)):
                if k:   # reward functions run in a worker thread: give the main thread's handler the first one
                    time.sleep(2)                       # (two signals pending at once would merge into one)
                os.kill(pid, num)
    fill = os.environ.get("LMPO_TEST_FILL")
    if fill:
        path, at = fill.rsplit("@", 1)
        if step == int(at):
            st = os.statvfs(path)
            with open(os.path.join(path, "filler"), "wb") as f:
                f.write(b"\\0" * (st.f_bavail * st.f_frsize - 64 * 1024))
    return [sum(c.isdigit() for c in s) / 4 for s in completions]
'''

STEPS = 3


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lmpo.data import load_rows

    d = tmp_path_factory.mktemp("crash")
    write_jsonl(d / "data.jsonl", load_rows("addition", required=("prompt",))[:32])
    (d / "rw.py").write_text(REWARD)
    return d


def cfg(tiny_dir, files, out, **kw):
    base = dict(dataset=files / "data.jsonl", reward_funcs=[f"{files / 'rw.py'}:digits"], beta=0.0, max_steps=STEPS,
                save_steps=1, log_samples=2, **{"algo.whiten_advantages": "true"})
    return rl_config(tiny_dir, out, **{**base, **kw})


@pytest.fixture(scope="module")
def straight(tiny_dir, files):
    out = files / "straight"
    train(cfg(tiny_dir, files, out))
    return out


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


def rows(out: Path, name="metrics.jsonl") -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in read_jsonl(out / name)]


def assert_same_run(out: Path, straight: Path, tiny_dir: Path):
    a, b = weights(straight), weights(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"
    from safetensors.torch import load_file

    w0 = load_file(str(tiny_dir / "model.safetensors"))
    assert any(not torch.equal(a[k], w0[k]) for k in a), "the runs did not move the weights"
    assert [r["step"] for r in rows(out)] == list(range(1, STEPS + 1))
    assert rows(out) == rows(straight)
    assert rows(out, "samples.jsonl") == rows(straight, "samples.jsonl")


def forked(fn, **env) -> int:
    """``fn()`` in a forked child with ``env`` set; its exit status (-N: killed by signal N)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.update(env)
            code = fn() or 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def cli(*args) -> int:
    from lmpo.cli import main

    return main(["train", *map(str, args)])


def overrides(tiny_dir, files, out, **kw) -> list[str]:
    from conftest import rl_overrides

    base = dict(dataset=files / "data.jsonl", reward_funcs=[f"{files / 'rw.py'}:digits"], beta=0.0, max_steps=STEPS,
                save_steps=1, log_samples=2, **{"algo.whiten_advantages": "true"})
    return rl_overrides(tiny_dir, out, **{**base, **kw})


# ----------------------------------------------------------------------------- SIGKILL while saving

# (point, step being saved): every fault point of the save path, in the save of step 2 (a previous
# checkpoint exists) and the first points in the save of step 1 (none does).
POINTS = [(p, 2) for p in (
    "save:begin", "save:policy:before", "save:policy:after", "save:tokenizer:after", "save:state.pt:during",
    "save:state.pt:after", "save:meta.json:during", "save:meta.json:after", "save:fsynced", "save:renamed",
    "save:latest.tmp:during", "save:latest.tmp:after", "save:latest:replaced", "save:pointed",
    "save:removed-old")] + [(p, 1) for p in ("save:begin", "save:state.pt:during", "save:renamed",
                                              "save:latest:replaced")]
SWITCHED = ("save:latest:replaced", "save:pointed", "save:removed-old")   # latest names the new step


def test_sigkill_at_every_save_point_resumes_to_the_straight_run(tiny_dir, files, straight, capsys):
    for point, step in POINTS:
        out = files / f"kill_{point.replace(':', '_')}_{step}"
        status = forked(lambda: train(cfg(tiny_dir, files, out)), LMPO_FAULT_POINT=f"{point}@{step}")
        assert status == -signal.SIGKILL, f"{point}@{step}: the fault point was not reached (status {status})"
        ckpt = find_checkpoint(out)
        expect = step if point in SWITCHED else step - 1
        assert (int(json.loads((ckpt / "meta.json").read_text())["step"]) if ckpt else 0) == expect, point
        capsys.readouterr()
        train(cfg(tiny_dir, files, out), resume=True)
        if expect == 0:
            assert "starting from step 0" in capsys.readouterr().err
        assert_same_run(out, straight, tiny_dir)
        left = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert left == [LATEST, f"step-{STEPS:08d}"], f"{point}@{step}: stale entries {left}"


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig, at, times", [(signal.SIGINT, 1, 1), (signal.SIGINT, 2, 1), (signal.SIGTERM, 1, 1),
                                            (signal.SIGTERM, 3, 1), (signal.SIGINT, 2, 2), (signal.SIGTERM, 3, 2)])
def test_signal_checkpoints_the_last_whole_step_and_resumes_to_the_straight_run(tiny_dir, files, straight, sig, at,
                                                                                 times):
    """One signal during step ``at``: the step is finished, saved, exit 128 + signal. Two: stop at
    once (here, during the reward, before the update): the checkpoint is step ``at`` - 1's."""
    out = files / f"sig_{sig}_{at}_{times}"
    status = forked(lambda: cli(*overrides(tiny_dir, files, out)), LMPO_TEST_SIGNAL=f"{sig}@{at}x{times}")
    assert status == 128 + sig
    done = at if times == 1 else at - 1
    ckpt = find_checkpoint(out)
    assert (json.loads((ckpt / "meta.json").read_text())["step"] if ckpt else 0) == done
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, done + 1))
    train(cfg(tiny_dir, files, out), resume=True)
    assert_same_run(out, straight, tiny_dir)


def test_sigterm_from_outside_exits_143_with_a_checkpoint(tiny_dir, files, tmp_path):
    """A real ``lmpo train`` process, SIGTERMed by another once it has logged a step."""
    import time

    from conftest import REPO

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmpo", "train", *overrides(tiny_dir, files, out, max_steps=100_000,
                                                                                save_steps=1000)],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600                       # generous: a loaded machine starts slowly
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=600)[1]
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err
    step = json.loads((find_checkpoint(out) / "meta.json").read_text())["step"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, step + 1))


# ----------------------------------------------------------------------------- the output directory


def test_fresh_run_into_an_earlier_run_refuses_or_starts_anew(tiny_dir, files, tmp_path, capsys):
    out = tmp_path / "run"
    train(cfg(tiny_dir, files, out, max_steps=2))
    assert cli(*overrides(tiny_dir, files, out, max_steps=1)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume" in err and "overwrite_output_dir" in err
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]          # untouched
    train(cfg(tiny_dir, files, out, max_steps=1, overwrite_output_dir=True))
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]             # anew, not appended
    assert [r["step"] for r in read_jsonl(out / "samples.jsonl")] == [1, 1]
    assert find_checkpoint(out).name == "step-00000001"


def test_second_run_into_a_locked_directory_fails_at_once(tiny_dir, files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with locked(out):                                 # another run holds the directory
        assert cli(*overrides(tiny_dir, files, out, model=tmp_path / "no-model")) == 2
        err = capsys.readouterr().err
        assert "in use by another lmpo run" in err and f"pid {os.getpid()}" in err
    assert not (out / "metrics.jsonl").exists()
    # a stale lock (its holder died: the kernel released the flock) is taken over
    (out / "lmpo.lock").write_text("pid 999999 on host gone\n")
    train(cfg(tiny_dir, files, out, max_steps=1))
    assert (out / "lmpo.lock").read_text().startswith(f"pid {os.getpid()} on host ")


@pytest.mark.parametrize("command", ["sft", "rm"])
def test_sft_and_rm_take_the_same_lock(command, tmp_path, capsys):
    """``lmpo sft`` and ``lmpo rm`` into a directory another run holds fail at once (before their
    model, here a missing one, is loaded); with the lock free the same command gets to the model."""
    from lmpo.cli import main

    out = tmp_path / "out"
    out.mkdir()
    args = [command, f"model={tmp_path / 'no-model'}", f"output_dir={out}"]
    with locked(out):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "in use by another lmpo run" in err and f"pid {os.getpid()}" in err
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no-model" in err and "in use" not in err


def test_output_dir_problems_are_reported_before_any_model_loads(tiny_dir, files, tmp_path, capsys, monkeypatch):
    """A missing model would fail the run too: the output_dir error must come first."""
    (tmp_path / "afile").write_text("x")
    no_model = tmp_path / "no-model"
    for out, words in ((tmp_path / "afile", "is not a directory"),
                       (tmp_path / "afile" / "run", "part of its path is a file")):
        assert cli(*overrides(tiny_dir, files, out, model=no_model)) == 2
        err = capsys.readouterr().err
        assert words in err and str(out) in err and "Traceback" not in err
    import lmpo.io.rundir as rundir

    real = shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: real(p)._replace(free=5 * 2**20))
    assert cli(*overrides(tiny_dir, files, tmp_path / "full", model=no_model)) == 2
    assert "5.0 MiB free" in capsys.readouterr().err
    monkeypatch.undo()
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:               # root writes through permission bits: a read-only mount instead
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode != 0:
            pytest.skip("cannot mount a read-only tmpfs")
    else:
        ro.chmod(0o500)
    try:
        assert cli(*overrides(tiny_dir, files, ro, model=no_model)) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "--lazy", str(ro)])
        else:
            ro.chmod(0o700)


def _no_space_mid_run(out, err):
    assert "no space left on device" in err and "step-00000002" in err and "--resume" in err, err[-2000:]
    assert "Traceback" not in err
    assert find_checkpoint(out).name == "step-00000001"                # the previous one is kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [LATEST, "step-00000001"]


def test_disk_full_while_saving_names_the_path_and_keeps_the_checkpoint(tiny_dir, files, straight, tmp_path, capsys,
                                                                        monkeypatch):
    """ENOSPC injected into the writer of state.pt in step 2's save."""
    import lmpo.io.checkpoint as ck

    real = ck.torch.save

    def save(obj, f, *a, **kw):
        if Path(getattr(f, "name", "")).parent.name == "step-00000002.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", save)
    out = tmp_path / "run"
    assert cli(*overrides(tiny_dir, files, out)) == 2
    _no_space_mid_run(out, capsys.readouterr().err)
    monkeypatch.undo()
    train(cfg(tiny_dir, files, out), resume=True)
    assert_same_run(out, straight, tiny_dir)


def test_disk_full_on_a_real_small_filesystem(tiny_dir, files, straight, tmp_path, capfd):
    """A 70 MiB tmpfs (root only), filled by the reward function during step 2: the metrics row
    still fits, step 2's checkpoint does not."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        out = mnt / "run"
        status = forked(lambda: cli(*overrides(tiny_dir, files, out)), LMPO_TEST_FILL=f"{mnt}@2")
        assert status == 2
        _no_space_mid_run(out, capfd.readouterr().err)
        (mnt / "filler").unlink()
        train(cfg(tiny_dir, files, out), resume=True)
        assert_same_run(out, straight, tiny_dir)
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)])       # lazy: memory-mapped weights may still be open


# ----------------------------------------------------------------------------- threads


def test_threads_follow_the_cpus_this_process_may_use(tmp_path):
    """With the affinity mask cut to one CPU (as taskset or a container would), torch gets one
    thread; OMP_NUM_THREADS and the 'threads' key take precedence."""
    from lmpo.config import load_config
    from lmpo.rl.setup import configure_threads, usable_cpus

    cpus = sorted(os.sched_getaffinity(0))

    def child():
        os.environ.pop("OMP_NUM_THREADS", None)
        os.sched_setaffinity(0, {cpus[0]})
        torch.set_num_threads(7)
        assert usable_cpus() == 1
        assert configure_threads(load_config(None, [])) == 1
        assert configure_threads(load_config(None, ["threads=3"])) == 3
        os.environ["OMP_NUM_THREADS"] = "5"
        torch.set_num_threads(5)
        assert configure_threads(load_config(None, [])) == 5           # the user's OMP_NUM_THREADS is kept
        return 0

    assert forked(child) == 0


def test_oversubscribed_cores_warn(monkeypatch):
    import warnings

    import lmpo.rl.setup as setup

    monkeypatch.setattr(setup, "usable_cpus", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setattr(setup, "runnable_now", lambda: 2.5)
    with pytest.warns(UserWarning, match="oversubscribed: load average 3.0, 2.5 tasks runnable now on 2 usable CPUs"):
        setup.warn_if_oversubscribed(2)
    monkeypatch.setattr(setup, "runnable_now", lambda: None)                # no /proc/stat: the load average alone
    with pytest.warns(UserWarning, match="oversubscribed: load average 3.0 on 2 usable CPUs"):
        setup.warn_if_oversubscribed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        setup.warn_if_oversubscribed(1)                                # one thread only shares the cores
        monkeypatch.setattr(setup, "runnable_now", lambda: 0.1)        # the load of a run that has just ended
        setup.warn_if_oversubscribed(2)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
        monkeypatch.setattr(setup, "runnable_now", lambda: 3.0)        # a burst: the minute's average is what counts
        setup.warn_if_oversubscribed(2)                                # a quiet machine


def test_runnable_now_reads_the_kernel_s_count():
    import lmpo.rl.setup as setup

    now = setup.runnable_now(samples=3, interval=0.001)
    if not os.path.exists("/proc/stat"):
        assert now is None
    else:
        assert now is not None and 0.0 <= now < 10_000


@pytest.mark.parametrize("cpu_max, cpus", [("150000 100000", 2), ("50000 100000", 1), ("max 100000", None)])
def test_cgroup_cpu_quota_caps_the_threads(tmp_path, monkeypatch, cpu_max, cpus):
    """A container granted 1.5 CPUs (cgroup v2 cpu.max) gets 2 threads, 0.5 CPUs 1, no quota all."""
    import lmpo.rl.setup as setup

    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    monkeypatch.setattr(setup, "CGROUP", tmp_path)
    affinity = len(os.sched_getaffinity(0))
    assert setup.usable_cpus() == (min(affinity, cpus) if cpus else affinity)
