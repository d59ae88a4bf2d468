"""code_tests: fraction of tests passed, fenced extraction, test formats, the prompt prepended to
HumanEval-style bodies, chat completions, TRL keywords, pool, crashes, the test namespace kept
apart from the solution's names, and a sandbox that refuses to run without its guarantees."""


import pytest

from lmpo.rewards import code_tests, sandbox
from lmpo.rewards.code_reward import CodeTests, extract_code, program
from lmpo.rewards.sandbox import SandboxLimits, SandboxUnavailable, run_code

TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4\nassert add(0, 5) == 5\n"
# A looping unit is stopped by its 2 CPU seconds (RLIMIT_CPU), which a busy machine does not shorten;
# the wall-clock limits (they include starting the sandboxed interpreter) are generous for a loaded machine.
FAST = SandboxLimits(cpu_s=2, wall_s=120, test_timeout_s=60, mem_mb=512)


@pytest.fixture(scope="module")
def reward(tmp_path_factory):
    return CodeTests(FAST, max_workers=4, tmp_root=str(tmp_path_factory.mktemp("sbx")))


def test_pass_partial_fail(reward):
    comps = ["def add(a, b):\n    return a + b\n",
             "def add(a, b):\n    return a * b if a == 2 else a + b + (a == 0)\n",  # passes 1, 2 (and 3 by luck)
             "def add(a, b):\n    return a - b\n",
             "this is not python"]
    out = reward(["p"] * 4, comps, tests=[TESTS] * 4)
    assert out == [1.0, 0.75, 0.0, 0.0]


def test_public_signature():
    out = code_tests(["p"], ["```python\ndef add(a, b):\n    return a + b\n```"], tests=[TESTS])
    assert out == [1.0]


def test_fenced_extraction():
    text = ("Here is a draft:\n```\nprint('untagged')\n```\nFinal:\n```python\ndef f():\n    return 1\n```\n"
            "and a shell line\n```bash\necho hi\n```\n")
    assert extract_code(text) == "def f():\n    return 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("plain code\n") == "plain code\n"
    assert extract_code("```python\ndef g():\n    return 2") == "def g():\n    return 2"  # truncated


def test_test_formats(reward):
    sol = "def double(x):\n    return 2 * x\n\nclass Counter:\n    def __init__(self):\n        self.n = 0\n" \
          "    def inc(self):\n        self.n += 1\n        return self.n\n"
    test_funcs = ("import math\n\ndef helper(v):\n    return v * 2\n\n"
                  "def test_one():\n    assert double(3) == helper(3)\n\n"
                  "def test_two():\n    c = Counter()\n    c.inc()\n    assert c.inc() == 2\n\n"
                  "def test_three():\n    assert double(0.5) == 1.0 and math.isclose(double(0.1), 0.2)\n\n"
                  "def test_wrong():\n    assert double(2) == 5\n")
    humaneval = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-1) == -2\n"
    snippets = ["assert double(1) == 2", "assert double(2) == 3", "from solution import double as d\nassert d(5) == 10"]
    out = reward(["p"] * 3, [sol] * 3, tests=[test_funcs, humaneval, snippets], entry_point=[None, "double", None])
    assert out == [0.75, 1.0, pytest.approx(2 / 3)]


def test_expected_exceptions_and_data_types(reward):
    sol = ("def parse(s):\n    if not s:\n        raise ValueError('empty')\n"
           "    return {'n': int(s), 'items': [1, (2, 3)], 'tags': {'a'}, 'x': 1.5, 'b': b'z'}\n")
    tests = ("def test_raises():\n    try:\n        parse('')\n    except ValueError:\n        return\n"
             "    assert False\n\nassert parse('4') == {'n': 4, 'items': [1, (2, 3)], 'tags': {'a'}, 'x': 1.5, 'b': b'z'}\n")
    assert reward(["p"], [sol], tests=[tests]) == [1.0]


def test_no_tests_is_not_applicable(reward):
    assert reward(["p", "q"], ["x = 1", "x = 1"], tests=["", None]) == [None, None]


def test_crashing_sample_does_not_stop_the_batch(reward):
    comps = ["import os\nos.abort()\n",  # SIGABRT at import
             "def add(a, b):\n    raise RuntimeError('boom')\n",
             "def add(a, b):\n    return a + b\n",
             "import sys\nsys.setrecursionlimit(10**6)\ndef add(a, b):\n    return add(a, b)\n"]
    out = reward(["p"] * 4, comps, tests=[TESTS] * 4)
    assert out == [0.0, 0.0, 1.0, 0.0]


def test_parallel_pool_overlaps_runs(tmp_path, monkeypatch):
    """Runs overlap in the bounded pool: count the sandboxes alive at once (no wall-clock timing)."""
    import threading

    sleepy = "import time\ndef add(a, b):\n    time.sleep(0.5)\n    return a + b\n"
    reward = CodeTests(FAST, max_workers=4, tmp_root=str(tmp_path))
    lock, active, peak = threading.Lock(), [0], [0]
    one = reward._one

    def counted(*args):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return one(*args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(reward, "_one", counted)
    out = reward(["p"] * 6, [sleepy] * 6, tests=["assert add(1, 2) == 3"] * 6)
    assert out == [1.0] * 6
    assert 2 <= peak[0] <= 4  # several at once, never more than max_workers
    assert list(tmp_path.iterdir()) == []  # every temp dir removed


def test_timeout_gives_partial_credit(reward):
    """The unit that loops forever is stopped (by its CPU limit); the other three still count."""
    slow = "def add(a, b):\n    while a == 2:\n        pass\n    return a + b\n"
    assert reward(["p"], [slow], tests=[TESTS]) == [0.75]


def test_output_is_captured_up_to_cap(tmp_path):
    r = run_code("print('x' * 100000)\ndef f():\n    print('called')\n    return 1\n", "assert f() == 1",
                 limits=SandboxLimits(output_cap=1000), tmp_root=str(tmp_path))
    assert r.passed == 1 and len(r.output) == 1000 and r.output.startswith("xxx")


def test_sandbox_guarantees_available_here():
    sandbox.check()  # raises SandboxUnavailable, naming what is missing, where they are not


def test_refuses_loudly_without_its_guarantees(monkeypatch):
    """No root: no namespaces, cgroup or uid change, so no run at all (not a weaker one)."""
    monkeypatch.setattr(sandbox, "_ready", None)
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    with pytest.raises(SandboxUnavailable, match="needs root"):
        run_code("x = 1", "assert x == 1")
    with pytest.raises(SandboxUnavailable, match="needs root"):  # the reward too: no NaN per sample
        CodeTests(FAST)(prompts=["p"], completions=["x = 1"], tests=["assert x == 1"])


def test_solution_cannot_shadow_builtins_or_test_helpers(reward):
    """A solution's top-level `sorted`, `abs`, `set`, `len` or a test helper's name must not
    replace what the tests call; the wrong `add` then scores 0 (it scored 0.75 before)."""
    tests = ("def close(a, b):\n    return abs(a - b) < 1e-9\n\n"
             "assert sorted(set([add(2, 1), add(1, 2)])) == [3]\n"
             "assert abs(add(-3, 1)) == 2\nassert len(str(add(10, 5))) == 2\n"
             "assert close(add(0.5, 0.25), 0.75)\n")
    hostile = ("def sorted(x):\n    return [3]\ndef abs(x):\n    return 2\ndef set(x):\n    return x\n"
               "def len(x):\n    return 2\ndef str(x):\n    return x\ndef close(a, b):\n    return True\n"
               "def add(a, b):\n    return None\n")
    honest = "def add(a, b):\n    return a + b\n"
    assert reward(["p"] * 2, [hostile, honest], tests=[tests] * 2) == [0.0, 1.0]


def test_entry_point_may_shadow_a_builtin(reward):
    """The entry point itself is the one solution name a test may call under a builtin's name."""
    sol = "def max(xs):\n    return -1 if not xs else sorted(xs)[-1]\n"
    assert reward(["p"], [sol], tests=["assert max([]) == -1\nassert max([3, 1]) == 3\n"],
                  entry_point=["max"]) == [1.0]


HE_PROMPT = ('from typing import List\n\n\ndef helper(x: int) -> int:\n    return x * 10\n\n\n'
             'def scale(xs: List[int]) -> List[int]:\n    """Multiply each element by ten."""\n')
HE_TEST = "def check(candidate):\n    assert candidate([1, 2]) == [10, 20]\n    assert candidate([]) == []\n"


def test_humaneval_body_and_full_function(reward):
    """A body-only continuation gets the prompt prepended; a full function (plain or in a chat
    message with a fence) replaces the prompt's stub and keeps its imports and helpers."""
    body = "    return [helper(x) for x in xs]\n"
    full = "def scale(xs: List[int]) -> List[int]:\n    return [helper(x) for x in xs]\n"
    chat = [{"role": "assistant", "content": "Sure:\n```python\n%s```\nDone." % full}]
    wrong = "    return xs\n"
    out = reward(prompts=[HE_PROMPT] * 4, completions=[body, full, chat, wrong],
                 tests=[HE_TEST] * 4, entry_point=["scale"] * 4)
    assert out == [1.0, 1.0, 1.0, 0.0]
    assert program(HE_PROMPT, body, "scale") == HE_PROMPT + body
    assert program(HE_PROMPT, full, "scale") == HE_PROMPT + "\n" + full
    assert program("Write a function scale(xs).", full, "scale") == full  # prose prompt: nothing prepended
    assert program(HE_PROMPT, body) == body  # no entry point: nothing prepended


def test_solution_block_is_graded_not_the_example_after_it(reward):
    """A chat reply with the solution in one block and example usage in a later one (as SmolLM2
    writes them) is graded on the block that defines the entry point; without an entry point the
    last block is taken, and a reply whose only definition is wrong still fails."""
    full = "def scale(xs: List[int]) -> List[int]:\n    return [helper(x) for x in xs]\n"
    usage = "print(scale([1, 2]))\n"
    reply = [{"role": "assistant", "content": f"```python\n{full}```\nExample:\n```python\n{usage}```"}]
    wrong = [{"role": "assistant", "content": f"```python\n{full.replace('helper(x)', 'x')}```\n```python\n{usage}```"}]
    out = reward(prompts=[HE_PROMPT] * 2, completions=[reply, wrong], tests=[HE_TEST] * 2, entry_point=["scale"] * 2)
    assert out == [1.0, 0.0]
    assert extract_code(reply[0]["content"], "scale") == full
    assert extract_code(reply[0]["content"]) == usage


def test_chat_prompts_and_completions(reward):
    prompt = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "add two numbers"}]
    comp = [{"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```"}]
    assert reward(prompts=[prompt], completions=[comp], tests=[TESTS]) == [1.0]


def test_trailing_check_call_runs_the_check_once(reward):
    """`check(entry_point)` at the end of a test file is not run again before the unit: a
    solution whose second call answers differently still passes the one check."""
    sol = "calls = [0]\ndef once():\n    calls[0] += 1\n    return calls[0]\n"
    tests = "def check(candidate):\n    assert candidate() == 1\n\ncheck(once)\n"
    assert reward(["p"], [sol], tests=[tests], entry_point=["once"]) == [1.0]
    assert reward.last_results[0].total == 1


def test_trl_keywords_and_unused_ones(reward):
    """Columns by keyword; TRL's other keywords (completion_ids, trainer_state, log_metric, ...) ignored."""
    out = reward(prompts=["p"], completions=["def add(a, b):\n    return a + b\n"], completion_ids=[[1, 2]],
                 tests=[TESTS], entry_point=[None], trainer_state={"global_step": 3}, log_metric=print,
                 log_extra=print, answer=["unused column"])
    assert out == [1.0]
