"""Where lmpo's PPO process memory goes: resident set (VmRSS) and its peak (VmHWM) after each phase.

    python bench/ppo_memory.py --model runs/demo/sft --steps 6            # bench/ppo_vs_trl.py's work
    python bench/ppo_memory.py --model runs/demo/sft --steps 6 key=value  # any lmpo train override

Runs ``lmpo.rl.loop.train`` in this process on bench/ppo_vs_trl.py's PPO work (64 prompts x 1 sample,
6 new tokens, β 0.04, critic from the policy, one epoch of one minibatch, one thread) and wraps the
loop's phases (setup, rollout, prepare, update, evaluation, checkpoint) to print the process's RSS
and peak RSS after each of them, first for the imports, then for each phase of the first steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def mem() -> tuple[float, float, float, float]:
    """RSS, peak RSS, and RSS's anonymous (heap) and file-backed (library code) parts, MiB."""
    kv = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(kv[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"))


def release_free_heap():
    """glibc's ``malloc_trim(0)``: the heap's free pages back to the system (they fault in again when
    reused). glibc serves blocks under its mmap threshold (which rises to 32 MiB once large blocks are
    freed) from its heap and keeps their pages resident after ``free``."""
    import ctypes

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim:
        trim(0)


def show(what: str, before: float | None = None):
    rss, peak, anon, file = mem()
    grew = f"  (+{rss - before:.1f})" if before is not None else ""
    print(f"{what:<28} rss {rss:7.1f} MiB  peak {peak:7.1f} MiB  anon {anon:7.1f}  file {file:6.1f}{grew}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--show-steps", type=int, default=2, help="print the phases of this many first steps")
    ap.add_argument("--trim", default="", help="comma-separated loop phases (collect, prepare, update) after "
                                                "which to call glibc's malloc_trim(0)")
    ap.add_argument("--modules", action="store_true", help="list the top-level modules imported at the end")
    ap.add_argument("--trim-before", default="", help="the same, before these phases (checkpoint, save_final)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    trim_after = {p for p in args.trim.split(",") if p}
    trim_before = {p for p in args.trim_before.split(",") if p}
    grew: list = []                                     # (phase, step, MiB the peak grew by during it)
    show("python")
    import torch  # noqa: F401
    show("import torch")
    import lmpo.rl.loop as L
    import lmpo.rl.setup as S
    from lmpo.config import load_config
    show(f"import lmpo ({len(sys.modules)} mod.)")

    step = {"n": 0}

    def wrap(mod, name, label=None):
        fn = getattr(mod, name)

        def inner(*a, **k):
            if name in trim_before:
                release_free_heap()
            before, peak0 = mem()[:2]
            res = fn(*a, **k)
            if name in trim_after:
                release_free_heap()
            if mem()[1] > peak0:
                grew.append((name, step["n"] + 1, mem()[1] - peak0))
            if step["n"] < args.show_steps or name in ("setup", "save_final", "evaluate_policy"):
                show(f"{label or name} (step {step['n'] + 1})" if name in ("collect", "prepare", "update") else name,
                     before)
            if name == "update":
                step["n"] += 1
            return res
        setattr(mod, name, inner)

    for name in ("setup",):
        wrap(L, name)
    for name in ("collect", "prepare", "update", "evaluate_policy", "save_final", "checkpoint"):
        wrap(L, name)
    with tempfile.TemporaryDirectory() as tmp:
        kv = dict(model=args.model, output_dir=tmp, algorithm="ppo", group_size=1, prompts_per_step=64,
                  max_new_tokens=6, learning_rate=3e-5, beta=0.04, max_steps=args.steps, epochs=1, minibatches=1,
                  seed=0, threads=1, progress="false", save_steps=10**6, log_samples=0,
                  **{"ppo.critic_init": "policy", "ppo.vf_coef": 0.1, "ppo.critic_learning_rate": 3e-5})
        cfg = load_config(None, [f"{k}={v}" for k, v in kv.items()] + args.overrides)
        L.train(cfg)
        from lmpo.io.logging import read_metrics

        rows = read_metrics(tmp)
        times = sorted(r["time/step_s"] for r in rows[5:] or rows)
        print(f"median s/step (after step 5): {times[len(times) // 2]:.4f}; trim after: {args.trim or 'none'}, "
              f"before: {args.trim_before or 'none'}")
        print("the peak grew during:", ", ".join(f"{n} (step {k}) +{d:.1f}" for n, k, d in grew))
    show("end")
    big = sorted({m.split(".")[0] for m in sys.modules})
    if args.modules:
        print("top-level modules:", " ".join(big))


if __name__ == "__main__":
    main()
