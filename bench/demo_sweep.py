"""What limits learning in the demo: GRPO and PPO settings from the demo's SFT start, many runs at once.

    python bench/demo_sweep.py --sft runs/demo/sft --out runs/sweep      # every job
    python bench/demo_sweep.py --sft runs/demo/sft --jobs grpo_lr2e-4,ppo_g1 --scale 0.1
    python bench/demo_sweep.py --table bench/results/demo_sweep_round1.jsonl     # the markdown table

Each job is ``lmpo train model=SFT ...`` in its own single-threaded process (``threads=1``), with
held-out greedy and sampled accuracy (the 200 held-out addition problems) every ``eval_steps``.
Jobs whose name starts with ``sft:`` first build another SFT start (``SFT_VARIANTS``). One line per
job goes to ``OUT/results.jsonl``: the overrides, the accuracy curve, samples seen, median s/step.
``--scale`` multiplies every job's steps (a quick check of the script). The tables in
docs/ppo_vs_grpo.md come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = ["beta=0.0", "max_new_tokens=6", "group_size=8", "prompts_per_step=16", "learning_rate=1e-4"]
PPO = ["algorithm=ppo", "ppo.critic_init=policy", "epochs=1", "minibatches=1"]

# name -> (SFT start, overrides); the SFT start "demo" is --sft
JOBS = {
    "grpo_base": ("demo", BASE + ["max_steps=1200"]),
    "grpo_lr2e-4": ("demo", BASE + ["max_steps=1200", "learning_rate=2e-4"]),
    "grpo_lr3e-4_wu50": ("demo", BASE + ["max_steps=1200", "learning_rate=3e-4", "warmup_steps=50"]),
    "grpo_lr2e-4_tokmean": ("demo", BASE + ["max_steps=1200", "learning_rate=2e-4", "algo.loss_agg=token-mean"]),
    "grpo_lr3e-4_drgrpo": ("demo", BASE + ["max_steps=1200", "learning_rate=3e-4", "algorithm=dr_grpo"]),
    "grpo_lr2e-4_32x8": ("demo", BASE + ["max_steps=600", "learning_rate=2e-4", "prompts_per_step=32"]),
    "grpo_lr4e-4_64x8": ("demo", BASE + ["max_steps=300", "learning_rate=4e-4", "prompts_per_step=64"]),
    "grpo_lr1e-4_8x16": ("demo", BASE + ["max_steps=1200", "prompts_per_step=8", "group_size=16"]),
    "grpo_lr2e-4_cliphigh": ("demo", BASE + ["max_steps=1200", "learning_rate=2e-4", "algo.eps_high=0.28"]),
    "grpo_sft06_lr1e-4": ("sft06", BASE + ["max_steps=1200"]),
    "grpo_sft06_lr2e-4": ("sft06", BASE + ["max_steps=1200", "learning_rate=2e-4"]),
    "grpo_sftb64_lr2e-4": ("sftb64", BASE + ["max_steps=1200", "learning_rate=2e-4"]),
    "ppo_g8_lr1e-4": ("demo", BASE + PPO + ["max_steps=400", "beta=0.02"]),
    "ppo_g1_lr3e-5_b04": ("demo", BASE + PPO + ["max_steps=400", "group_size=1", "prompts_per_step=64",
                                                "learning_rate=3e-5", "beta=0.04"]),
    "ppo_g1_lr1e-4": ("demo", BASE + PPO + ["max_steps=400", "group_size=1", "prompts_per_step=128", "beta=0.02"]),
    "ppo_g1_lr1e-4_wu20": ("demo", BASE + PPO + ["max_steps=400", "group_size=1", "prompts_per_step=128",
                                                 "beta=0.02", "ppo.critic_warmup_steps=20"]),
}
COS = ["lr_schedule=cosine"]
G1 = ["group_size=1", "prompts_per_step=128"]
JOBS2 = {   # the second round: cosine decay, more prompts per step, later SFT stops, cheaper PPO
    "cos_1e-4": ("demo", BASE + COS + ["max_steps=1000"]),
    "cos_2e-4": ("demo", BASE + COS + ["max_steps=1000", "learning_rate=2e-4"]),
    "cos_2e-4_32x4": ("demo", BASE + COS + ["max_steps=1000", "learning_rate=2e-4", "prompts_per_step=32", "group_size=4"]),
    "cos_1.5e-4_32x4": ("demo", BASE + COS + ["max_steps=1000", "learning_rate=1.5e-4", "prompts_per_step=32",
                                              "group_size=4"]),
    "cos_3e-4_32x8": ("demo", BASE + COS + ["max_steps=500", "learning_rate=3e-4", "prompts_per_step=32"]),
    "sft06_cos_1e-4": ("sft06", BASE + COS + ["max_steps=1000"]),
    "sft06_cos_2e-4": ("sft06", BASE + COS + ["max_steps=1000", "learning_rate=2e-4"]),
    "sft06_cos_1.5e-4_32x4": ("sft06", BASE + COS + ["max_steps=1000", "learning_rate=1.5e-4", "prompts_per_step=32",
                                                     "group_size=4"]),
    "sft05_cos_1.5e-4": ("sft05", BASE + COS + ["max_steps=1000", "learning_rate=1.5e-4"]),
    "ppo_g1_cos_2e-4": ("demo", BASE + PPO + G1 + COS + ["max_steps=300", "learning_rate=2e-4", "beta=0.02"]),
    "ppo_g1_beta0": ("demo", BASE + PPO + G1 + ["max_steps=300"]),
    "ppo_g4_32": ("demo", BASE + PPO + ["max_steps=300", "group_size=4", "prompts_per_step=32", "beta=0.02"]),
    "ppo_g1_64_400": ("demo", BASE + PPO + ["max_steps=400", "group_size=1", "prompts_per_step=64", "beta=0.02"]),
    "ppo_g1_shared": ("demo", BASE + PPO + G1 + ["max_steps=300", "beta=0.02", "ppo.critic=shared"]),
    "sft06_ppo_g1": ("sft06", BASE + PPO + G1 + ["max_steps=300", "beta=0.02"]),
}
JOBS.update(JOBS2)
DEMO_GRPO = BASE + COS + ["learning_rate=2e-4", "prompts_per_step=32", "group_size=4"]
DEMO_PPO = BASE + PPO + G1 + COS + ["learning_rate=2e-4", "beta=0.02"]
JOBS3 = {   # round 3: the demo's GRPO (32 x 4, cosine 2e-4) and PPO (128 x 1) from later or shorter SFT starts
    "sft07_grpo1000": ("sft07", DEMO_GRPO + ["max_steps=1000"]),
    "sft07_ppo300": ("sft07", DEMO_PPO + ["max_steps=300"]),
    "sft07_ppo350_beta0": ("sft07", DEMO_PPO + ["max_steps=350", "beta=0.0"]),
    "sft07_ppo300_3e-4": ("sft07", DEMO_PPO + ["max_steps=300", "learning_rate=3e-4"]),
    "sft07_grpo1000_16x8": ("sft07", DEMO_GRPO + ["max_steps=1000", "prompts_per_step=16", "group_size=8"]),
    "sft07_grpo1200": ("sft07", DEMO_GRPO + ["max_steps=1200"]),
    "sft07_grpo1000_wu50": ("sft07", DEMO_GRPO + ["max_steps=1000", "warmup_steps=50"]),
    "sft07_grpo1000_1.5e-4": ("sft07", DEMO_GRPO + ["max_steps=1000", "learning_rate=1.5e-4"]),
}
JOBS.update(JOBS3)
SFT_VARIANTS = {
    # the demo's SFT, stopped later (validation accuracy 0.6 instead of 0.4)
    "sft06": dict(max_steps=450, batch_size=256, learning_rate=3e-3, warmup_steps=30, eval_steps=25,
                  stop_at_accuracy=0.6),
    "sft05": dict(max_steps=450, batch_size=256, learning_rate=3e-3, warmup_steps=30, eval_steps=25,
                  stop_at_accuracy=0.5),
    # a quarter of the batch: fewer samples to the same validation accuracy?
    "sftb64": dict(max_steps=1500, batch_size=64, learning_rate=3e-3, warmup_steps=30, eval_steps=50,
                   stop_at_accuracy=0.4),
    # round 3: a fixed budget, the cosine decayed to 0 at its end (no early stop: the start is the same every run)
    "sft250": dict(max_steps=250, batch_size=256, learning_rate=3e-3, warmup_steps=30, eval_steps=50),
    "sft300": dict(max_steps=300, batch_size=256, learning_rate=3e-3, warmup_steps=30, eval_steps=50),
    "sft350": dict(max_steps=350, batch_size=256, learning_rate=3e-3, warmup_steps=30, eval_steps=50),
    "sft07_lr6e-3": dict(max_steps=450, batch_size=256, learning_rate=6e-3, warmup_steps=30, eval_steps=25,
                         stop_at_accuracy=0.7),
    "sft07": dict(max_steps=450, batch_size=256, learning_rate=3e-3, warmup_steps=30, eval_steps=25,
                  stop_at_accuracy=0.7),
}


def build_sft(name: str, out: Path) -> dict:
    from lmpo.config import SFTConfig
    from lmpo.stages.sft import train_sft

    from lmpo.data import addition_heldout
    from lmpo.models.load import load_causal_lm, load_tokenizer
    from lmpo.rewards import addition_exact
    from lmpo.stages.evaluate import evaluate

    t0 = time.time()
    m = train_sft(SFTConfig(output_dir=str(out), threads=1, device="cpu", progress=False, **SFT_VARIANTS[name]))
    seconds = round(time.time() - t0, 1)
    model, tok = load_causal_lm(str(out)), load_tokenizer(str(out))         # held-out, as the demo's acc()
    held = [evaluate(model, tok, addition_heldout(), addition_exact, max_new_tokens=6, temperature=t)["accuracy"]
            for t in (0.0, 1.0)]
    return {"sft": name, "steps": m["steps"], "samples": m["steps"] * SFT_VARIANTS[name]["batch_size"],
            "seconds": seconds, "history": m["history"], "heldout_greedy_sampled": held}


def run_job(name: str, model, overrides: list[str], out: Path, scale: float, eval_steps: int, deadline: float) -> dict:
    model = model.result() if hasattr(model, "result") else model
    over = [o if not o.startswith("max_steps=") else f"max_steps={max(2, int(int(o.split('=')[1]) * scale))}"
            for o in overrides]
    steps = int(next(o for o in over if o.startswith("max_steps=")).split("=")[1])
    cmd = [sys.executable, "-m", "lmpo", "train", f"model={model}", f"output_dir={out / name}", "threads=1", "device=cpu",
           "progress=false", "save_steps=100000", "log_samples=0", f"eval_steps={max(1, min(eval_steps, steps))}",
           *over]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:                       # past --deadline: keep the curve so far
        proc.kill()
        _, err = proc.communicate()
    res = {"job": name, "overrides": over, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    if not (out / name / "metrics.jsonl").exists():
        res["error"] = err[-2000:]
        return res
    rows = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    res["curve"] = [(r["step"], r["eval/greedy_accuracy"], r["eval/sampled_accuracy"]) for r in rows
                    if "eval/greedy_accuracy" in r]
    res["reward"] = [round(r["reward/mean"], 3) for r in rows[:: max(1, len(rows) // 40)]]
    res["s_per_step"] = statistics.median(r["time/step_s"] for r in rows)
    res["steps_done"] = len(rows)
    return res


def markdown(paths: list[str]) -> str:
    """One row per job: its start, what differs from BASE, held-out greedy / sampled along the run."""
    lines = ["| job | start | settings (besides 16 prompts × 8, lr 1e-4, β 0) | samples/step | s/step | "
             "greedy / sampled at steps |", "|---|---|---|---|---|---|"]
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            if "sft" in r:
                continue
            start = JOBS[r["job"]][0] if r["job"] in JOBS else "?"
            kv = dict(o.split("=", 1) for o in r["overrides"])
            base = dict(o.split("=", 1) for o in BASE)
            diff = ", ".join(f"{k}={v}" for k, v in kv.items() if base.get(k) != v and k != "max_steps")
            n = int(kv["prompts_per_step"]) * int(kv["group_size"])
            pts = [c for c in r.get("curve", []) if c[0] % 200 == 0 or c is r["curve"][-1]]
            curve = "; ".join(f"{s}: {g:.2f} / {sm:.2f}" for s, g, sm in pts)
            lines.append(f"| {r['job']} | {start} | {diff} | {n} | {r.get('s_per_step', 0):.3f} | {curve} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--table":
        print(markdown(argv[1:]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", required=True, help="the demo's SFT start (runs/demo/sft)")
    ap.add_argument("--out", default="runs/sweep")
    ap.add_argument("--jobs", default=",".join(JOBS))
    ap.add_argument("--deadline", type=float, default=1e6, help="seconds; runs still going then are stopped, their curve kept")
    ap.add_argument("--results", default=None, help="results file (default OUT/results.jsonl)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--eval-steps", type=int, default=100)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.jobs.split(",") if n]
    deadline = time.time() + args.deadline
    results = Path(args.results or out / "results.jsonl")

    def record(r):
        with open(results, "a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(json.dumps({k: v for k, v in r.items() if k != "reward"}), flush=True)

    with ThreadPoolExecutor(len(names) + len(SFT_VARIANTS)) as pool:
        starts = {"demo": Path(args.sft)}
        for s in sorted({JOBS[n][0] for n in names} - {"demo"}):
            if (out / s / "sft_metrics.json").exists():            # built by an earlier call: reuse it
                starts[s] = out / s
                continue
            starts[s] = pool.submit(lambda s=s: (record(build_sft_proc(s, out / s, args.scale)), out / s)[1])
        futs = [pool.submit(run_job, n, starts[JOBS[n][0]], JOBS[n][1], out, args.scale, args.eval_steps, deadline)
                for n in names]
        for f in futs:
            record(f.result())


def build_sft_proc(name: str, out: Path, scale: float) -> dict:
    """build_sft in its own single-threaded process (torch threads are per process)."""
    code = (f"import json,sys; sys.path.insert(0,{str(ROOT)!r}); import bench.demo_sweep as d; "
            f"d.SFT_VARIANTS[{name!r}]['max_steps']=max(2,int(d.SFT_VARIANTS[{name!r}]['max_steps']*{scale})); "
            f"print(json.dumps(d.build_sft({name!r}, __import__('pathlib').Path({str(out)!r}))))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode:
        return {"sft": name, "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
