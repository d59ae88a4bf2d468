"""GRPO, RLOO and PPO on the two built-in environments (docs/ppo_vs_grpo.md, "Environments").

    python bench/env_compare.py [--steps 150] [--lr 1e-4] [--model DIR] [--output-dir runs/env_compare] [--parallel]

addition_retry can be reset (a group is G episodes from one state); addition_chain cannot (each
episode draws its own state; GRPO and RLOO run with env.nonresettable_groups=allow, REINFORCE++
with its batch baseline needs no groups). Every run: the embedded SFT model (or --model), 16 rows
× G = 8 episodes per step, at most 2 turns and 24 completion tokens per episode, one CPU thread,
its own process. PPO is the examples/addition_ppo.yaml recipe (separate critic from the policy,
k1 KL β = 0.02 in the reward, 2 epochs × 2 minibatches). Prints a table and writes
OUTPUT/env_compare.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RUNS = [("addition_retry", "grpo"), ("addition_retry", "rloo"), ("addition_retry", "ppo"),
        ("addition_chain", "grpo"), ("addition_chain", "rloo"), ("addition_chain", "ppo"),
        ("addition_chain", "reinforce_pp")]
PPO = {"beta": 0.02, "epochs": 2, "minibatches": 2, "ppo": {"critic": "separate", "critic_init": "policy"}}


def config(env: str, algo: str, steps: int, model, out: Path, lr: float = 1e-4) -> dict:
    cfg = {"dataset": "addition", "reward_funcs": ["env_reward"], "eval_reward_funcs": ["addition_exact"],
           "algorithm": algo, "group_size": 8, "prompts_per_step": 16, "max_steps": steps, "learning_rate": lr,
           "beta": 0.0, "max_new_tokens": 6, "seed": 0, "threads": 1, "progress": False, "save_steps": 10_000,
           "output_dir": str(out / f"{env}_{algo}"),
           "env": {"name": env, "max_turns": 2, "max_tokens": 24}}
    if model:
        cfg["model"] = str(model)
    if algo == "ppo":
        cfg.update(PPO)
    if env == "addition_chain" and algo in ("grpo", "rloo"):
        cfg["env"]["nonresettable_groups"] = "allow"
    return cfg


def launch(cfgs: list[dict], out: Path, parallel: bool):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = []
    for cfg in cfgs:
        path = out / (Path(cfg["output_dir"]).name + ".yaml")
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        log = open(out / (Path(cfg["output_dir"]).name + ".log"), "w")
        p = subprocess.Popen([sys.executable, "-m", "lmpo", "train", str(path)], env=env, stdout=log, stderr=log)
        procs.append(p)
        if not parallel:
            p.wait()
    return [p.wait() for p in procs]


def summarize(env: str, algo: str, run: Path) -> dict:
    from lmpo.io.logging import read_metrics

    m = read_metrics(run)
    s = json.loads((run / "summary.json").read_text())
    r = [x.get("reward/env_reward/mean") for x in m]
    r = [x if x is not None else float("nan") for x in r]
    n = max(1, len(r) // 10)
    first, last = sum(r[:n]) / n, sum(r[-n:]) / n
    samples = s["samples_per_step"] * len(m)
    return {"env": env, "algorithm": algo, "steps": len(m), "samples": samples, "wall_s": s["wall_s"],
            "reward_first": first, "reward_last": last, "reward_mean": sum(r) / len(r),
            "gain_per_1k_samples": (last - first) / (samples / 1000), "gain_per_min": (last - first) / (s["wall_s"] / 60),
            "samples_per_s": samples / s["wall_s"], "peak_rss_mib": s["peak_rss_mib"],
            "model_state_mib": sum(s["model_state_mib"].values()), "held_out_greedy": s.get("eval/greedy_accuracy"),
            "curve": r, "seconds": [sum(x["time/step_s"] for x in m[:i + 1]) for i in range(len(m))]}


def table(rows: list[dict]) -> str:
    head = ("| environment | algorithm | env reward first → last 10 % | mean reward per sample | gain / 1k samples | "
            "gain / min | samples/s | wall s | peak RSS MiB | params+grads+optim MiB | held-out single-turn greedy |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for x in rows:
        g = "—" if x["held_out_greedy"] is None else f"{x['held_out_greedy']:.3f}"
        lines.append(f"| {x['env']} | {x['algorithm']} | {x['reward_first']:.3f} → {x['reward_last']:.3f} | "
                     f"{x['reward_mean']:.3f} | {x['gain_per_1k_samples']:+.4f} | {x['gain_per_min']:+.4f} | "
                     f"{x['samples_per_s']:.0f} | {x['wall_s']:.0f} | {x['peak_rss_mib']:.0f} | "
                     f"{x['model_state_mib']:.1f} | {g} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({x["env"] for x in rows}, reverse=True)
    fig, axes = plt.subplots(2, len(envs), figsize=(6 * len(envs), 7), squeeze=False)
    for j, env in enumerate(envs):
        for x in [x for x in rows if x["env"] == env]:
            c, k = x["curve"], 10
            smooth = [sum(c[max(0, i - k + 1):i + 1]) / len(c[max(0, i - k + 1):i + 1]) for i in range(len(c))]
            per = x["samples"] / max(1, x["steps"])
            axes[0][j].plot([per * (i + 1) for i in range(len(c))], smooth, label=x["algorithm"])
            axes[1][j].plot(x["seconds"], smooth, label=x["algorithm"])
        axes[0][j].set_title(f"{env}: env reward (10-step mean) per sample")
        axes[0][j].set_xlabel("episodes")
        axes[1][j].set_title(f"{env}: per second (one CPU thread each)")
        axes[1][j].set_xlabel("seconds")
        for a in axes[:, j]:
            a.set_ylabel("env reward")
            a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--model", default=None, help="policy directory (default: the embedded SFT model)")
    ap.add_argument("--output-dir", default="runs/env_compare")
    ap.add_argument("--parallel", action="store_true", help="all runs at once (one core each)")
    ap.add_argument("--only", default=None, help="comma-separated env_algo names to run (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(e, a) for e, a in RUNS if not args.only or f"{e}_{a}" in args.only.split(",")]
    codes = launch([config(e, a, args.steps, args.model, out, args.lr) for e, a in runs], out, args.parallel)
    rows = [summarize(e, a, out / f"{e}_{a}") for (e, a), c in zip(runs, codes) if c == 0]
    for (e, a), c in zip(runs, codes):
        if c != 0:
            print(f"{e}_{a} failed (exit {c}); see {out}/{e}_{a}.log")
    (out / "env_compare.json").write_text(json.dumps(rows, indent=2))
    (out / "env_compare.md").write_text(table(rows) + "\n")
    plot(rows, out / "env_compare.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
