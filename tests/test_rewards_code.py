"""code_tests: fraction of tests passed, fenced extraction, test formats, pool, crashes."""


import pytest

from lmpo.rewards import code_tests
from lmpo.rewards.code_reward import CodeTests, extract_code
from lmpo.rewards.sandbox import SandboxLimits, isolation, run_code

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


def test_isolation_is_detected():
    iso = isolation()
    assert iso.name in ("namespaces+uid", "namespaces", "userns", "none")
