"""The hostile corpus (tests/hostile/*.py): every attack ends with its expected reward, within
its time limit, and leaves nothing behind. Run `python bench/hostile_table.py` for the table."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "hostile"))
import corpus  # noqa: E402

PROGRAMS = corpus.load_programs()


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    from lmpo.rewards import sandbox

    # Never run the corpus unconfined: the sandbox raises SandboxUnavailable (naming what is
    # missing) instead of running with weaker isolation, and this fixture lets that error fail the tests.
    sandbox.check()
    stage = corpus.setup(str(tmp_path_factory.mktemp("hostile")))
    try:
        outcomes = corpus.run(stage, PROGRAMS)
        problems = corpus.leftovers(stage)
    finally:
        corpus.teardown(stage)
    return {o.program.name: o for o in outcomes}, problems


def test_corpus_size():
    assert len(PROGRAMS) >= 15
    assert {"infinite_loop", "fork_bomb", "memory_bomb", "huge_file", "stdout_flood", "net_loopback",
            "net_outside", "env_secret", "write_outside", "kill_parent", "setsid_daemon", "sys_exit_pass",
            "os_exit_pass", "fake_marker", "monkeypatch_harness"} <= {p.name for p in PROGRAMS}
    new = {"builtin_shadow", "read_dataset", "host_paths", "unix_socket", "abstract_socket", "sysv_ipc",
           "posix_shm", "memory_split", "proc_others", "ptrace_attach", "signal_everyone", "userns_escape",
           "symlink_escape", "hardlink_escape", "chroot_escape", "raise_systemexit", "unittest_patch",
           "patch_harness_files", "fd_leak", "cgroup_escape", "privilege"}
    assert new <= {p.name for p in PROGRAMS}
    assert len(PROGRAMS) >= 35


@pytest.mark.parametrize("name", [p.name for p in PROGRAMS])
def test_hostile_program(outcome, name):
    outcomes, _ = outcome
    o = outcomes[name]
    assert o.reward == pytest.approx(o.program.expect), (name, o.status, o.results)
    assert o.status == "ok", o.status  # the harness reported (it was not killed from outside)
    # how long each took is reported by bench/hostile_table.py; tests assert no wall-clock times


def test_memory_is_bounded_for_the_whole_completion(outcome):
    """memory_split holds 12 x 100 MB in 12 processes, each under its own RLIMIT_AS: the run's
    cgroup kept all of them together at or under mem_mb."""
    outcomes, _ = outcome
    limit = corpus.LIMITS["mem_mb"]
    assert outcomes["memory_split"].peak_mb is not None
    assert all(o.peak_mb is not None and o.peak_mb <= limit for o in outcomes.values()), \
        {n: o.peak_mb for n, o in outcomes.items() if o.peak_mb is None or o.peak_mb > limit}


def test_nothing_left_behind(outcome):
    _, problems = outcome
    assert problems == []
    assert os.getpid() > 0  # and the trainer (this process) is alive to say so
