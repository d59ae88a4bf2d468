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
    from lmpo.rewards.sandbox import isolation

    # Never run the corpus unconfined: if namespaces stopped working, fail here, clearly.
    assert isolation().name != "none", "the sandbox fell back to no isolation; refusing to run hostile code"
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


@pytest.mark.parametrize("name", [p.name for p in PROGRAMS])
def test_hostile_program(outcome, name):
    outcomes, _ = outcome
    o = outcomes[name]
    assert o.reward == pytest.approx(o.program.expect), (name, o.status, o.results)
    assert o.status == "ok", o.status  # the harness reported (it was not killed from outside)
    # how long each took is reported by bench/hostile_table.py; tests assert no wall-clock times


def test_nothing_left_behind(outcome):
    _, problems = outcome
    assert problems == []
    assert os.getpid() > 0  # and the trainer (this process) is alive to say so
