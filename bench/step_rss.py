"""Resident memory through lmpo's phases: ``lmpo train``'s loop run step by step with an RSS sampler
(every 5 ms), printing the RSS at each phase boundary and the peak since the previous one.

    PYTHONPATH=. python bench/step_rss.py model=smollm2 dataset=examples/smollm2_math/train.jsonl \\
        reward_funcs=[math_answer] prompts_per_step=2 group_size=4 max_new_tokens=64 beta=0 threads=1 \\
        output_dir=/tmp/step_rss max_steps=3 [padding_free=true dtype=bfloat16 ...]

Phases: setup, collect (rollout + reward), the training forward (``loss_fn``), the backward (up to
``clip_and_step``), the optimizer step. RSS counts memory the allocator has freed but kept mapped; glibc's
own count (``mallinfo2``) of the bytes in use and the bytes it holds is printed beside it.
"""

from __future__ import annotations

import ctypes
import resource
import sys
import threading
import time

from lmpo.config import load_config
from lmpo.rl import loop as L


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]


def malloc_mib() -> tuple[float, float]:
    """(bytes glibc's malloc has handed out and not had back, bytes it holds from the system) in MiB
    (``mallinfo2``: in-use arena blocks + mmapped chunks; arena + mmapped); (nan, nan) without glibc."""
    try:
        f = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return float("nan"), float("nan")
    f.restype = _Mallinfo2
    m = f()
    return (m.uordblks + m.hblkhd) / 2**20, (m.arena + m.hblkhd) / 2**20


def main(argv=None):
    cfg = load_config(None, [*(sys.argv[1:] if argv is None else argv), "progress=false", "eval_steps=0"])
    peak = [0.0]

    def sample():
        while True:
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()

    def mark(name):
        live, held = malloc_mib()
        print(f"  {name:10s} RSS {rss_mib():6.0f} MiB, peak since the last mark {peak[0]:6.0f} MiB; "
              f"malloc in use {live:6.0f}, held {held:6.0f} MiB", flush=True)
        peak[0] = 0.0

    loss_fn, clip_and_step = L.loss_fn, L.clip_and_step

    def timed_loss(*a, **k):
        mark("before fwd")
        out = loss_fn(*a, **k)
        mark("forward")
        return out

    def timed_step(*a, **k):
        mark("backward")
        out = clip_and_step(*a, **k)
        mark("optimizer")
        return out

    L.loss_fn, L.clip_and_step = timed_loss, timed_step
    run = L.start(cfg)
    mark("setup")
    for step in range(cfg.max_steps):
        t = L.Timer()
        batch, _ = L.collect(run, t)
        mark("collect")
        L.prepare(run, batch, t)
        L.update(run, batch, t)
        run.counters.step += 1
        run.rollout.engine.update_weights(run.actor.model, run.counters.step)
        print(f"step {run.counters.step}: " + " ".join(f"{k}={v:.2f}s" for k, v in t.items()), flush=True)
    print(f"peak RSS (getrusage) {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
