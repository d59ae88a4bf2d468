"""Run the hostile corpus (tests/hostile/) through the code sandbox and print the table for
docs/rewards.md: program, what it tries, what stops it, expected and actual reward, time, peak
memory of its cgroup, how its units ended, and what was left behind.
Usage (as root): python bench/hostile_table.py"""

import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "hostile"))

import corpus  # noqa: E402

from lmpo.rewards import sandbox  # noqa: E402


def main():
    sandbox.check()
    programs = corpus.load_programs()
    with tempfile.TemporaryDirectory() as base:
        stage = corpus.setup(base)
        try:
            t0 = time.monotonic()
            outcomes = corpus.run(stage, programs)
            total = time.monotonic() - t0
            problems = corpus.leftovers(stage)
        finally:
            corpus.teardown(stage)
    limits = corpus.LIMITS
    print("limits: %s CPU s, %s s wall, %s s per test, %s MB per completion (cgroup), %s processes; "
          "%d programs run concurrently in %.1f s on %d CPUs\n"
          % (limits["cpu_s"], limits["wall_s"], limits["test_timeout_s"], limits["mem_mb"],
             limits["nproc"], len(programs), total, os.cpu_count()))
    print("| program | what it tries | what stops it | expected | reward | time (s) | peak MB | how it ended |")
    print("|---|---|---|---|---|---|---|---|")
    ok = True
    for o in outcomes:
        reasons = sorted({(r[2] or "passed").split(":")[0] for r in o.results}) or [o.status]
        good = abs(o.reward - o.program.expect) < 1e-9
        ok &= good
        print("| %s | %s | %s | %.2f | %.2f%s | %.2f | %s | %s |"
              % (o.program.name, o.program.tries, o.program.stopped_by, o.program.expect, o.reward,
                 "" if good else " (WRONG)", o.seconds,
                 "-" if o.peak_mb is None else "%.0f" % o.peak_mb, ", ".join(reasons)))
    print("\nleft behind (processes, files outside the sandbox, connections, harm): %s"
          % ("; ".join(problems) if problems else "nothing"))
    return 0 if ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
