"""``lmpo compare``: GRPO, PPO and any other presets on the same task, model, prompt budget, seed.

Each algorithm runs in its own process (so peak RSS is its own) with identical settings except the
preset; the table reports what was measured: peak process RSS, bytes of parameters + gradients +
optimizer state per model, median seconds per step, samples per second, the reward curve and
held-out accuracy. ``compare.png`` plots the reward curves and the memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

from .config import Config, ConfigError, load_config, to_dict


def _deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = _deep_update(dict(d.get(k) or {}), v) if isinstance(v, dict) else v
    return d


def compare_runs(base: Config, algorithms: list[str], out_dir, steps: dict | None = None,
                 overrides: dict | None = None) -> list[dict]:
    """Run each algorithm as ``python -m lmpo train`` in its own process; return one row each."""
    out = Path(out_dir)
    rows = []
    for name in algorithms:
        cfg = _deep_update(to_dict(base), {"algorithm": name, "output_dir": str(out / name), "progress": False})
        if steps and name in steps:
            cfg["max_steps"] = steps[name]
        if overrides and name in overrides:
            _deep_update(cfg, overrides[name])
        path = out / f"{name}.yaml"
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"-- {name}: {cfg['max_steps']} steps", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                             os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-m", "lmpo", "train", str(path)], env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"lmpo compare: the {name} run failed (exit {proc.returncode}); see its output above.")
        rows.append(summarize(name, Path(cfg["output_dir"])))
    plot(rows, out / "compare.png")
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(markdown_table(rows) + "\n")
    return rows


def summarize(name: str, run_dir: Path) -> dict:
    from .train.logging import read_metrics

    metrics = read_metrics(run_dir)
    res = json.loads((run_dir / "summary.json").read_text())
    steps = [m["time/step_s"] for m in metrics][1:] or [m["time/step_s"] for m in metrics]
    rewards = [m.get("reward/mean") for m in metrics]
    k = max(1, min(20, len(rewards) // 2))
    mean = lambda xs: sum(x for x in xs if x is not None) / max(1, sum(x is not None for x in xs))  # noqa: E731
    step_s = statistics.median(steps)
    return {
        "algorithm": name, "steps": len(metrics),
        "peak_rss_mib": res["peak_rss_mib"],
        "model_state_mib": res["model_state_mib"],
        "s_per_step": step_s,
        "samples_per_s": res["samples_per_step"] / step_s,
        "reward_first": mean(rewards[:k]), "reward_last": mean(rewards[-k:]),
        "reward_curve": rewards,
        "greedy_accuracy": res.get("eval/greedy_accuracy"), "sampled_accuracy": res.get("eval/sampled_accuracy"),
        "wall_s": res["wall_s"],
    }


def markdown_table(rows: list[dict]) -> str:
    head = ("| algorithm | peak RSS MiB | params+grads+optim MiB | s/step (median) | samples/s | "
            "reward first→last | held-out greedy | held-out sampled | wall s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        state = ", ".join(f"{k} {v:.1f}" for k, v in r["model_state_mib"].items())
        lines.append(f"| {r['algorithm']} | {r['peak_rss_mib']:.0f} | {state} | {r['s_per_step']:.3f} | "
                     f"{r['samples_per_s']:.0f} | {r['reward_first']:.3f} → {r['reward_last']:.3f} | "
                     f"{_f(r['greedy_accuracy'])} | {_f(r['sampled_accuracy'])} | {r['wall_s']:.0f} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[1]
        ratio_mem = b["peak_rss_mib"] / a["peak_rss_mib"]
        sa, sb = sum(a["model_state_mib"].values()), sum(b["model_state_mib"].values())
        lines.append(f"\n{b['algorithm']} / {a['algorithm']}: peak RSS ×{ratio_mem:.2f}, model state ×{sb / sa:.2f}, "
                     f"time per step ×{b['s_per_step'] / a['s_per_step']:.2f}")
    return "\n".join(lines)


def _f(x):
    return "—" if x is None else f"{x:.3f}"


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        curve = [x if x is not None else float("nan") for x in r["reward_curve"]]
        k = 5
        smooth = [sum(curve[max(0, i - k + 1):i + 1]) / len(curve[max(0, i - k + 1):i + 1]) for i in range(len(curve))]
        ax1.plot(range(1, len(curve) + 1), smooth, label=r["algorithm"])
    ax1.set_xlabel("step")
    ax1.set_ylabel("mean reward (5-step moving average)")
    ax1.set_title("reward")
    ax1.legend()
    names = [r["algorithm"] for r in rows]
    ax2.bar([n + "\nRSS" for n in names], [r["peak_rss_mib"] for r in rows], color="tab:gray")
    ax2.bar([n + "\nstate" for n in names], [sum(r["model_state_mib"].values()) for r in rows], color="tab:blue")
    ax2.set_ylabel("MiB")
    ax2.set_title("peak process RSS and params+grads+optimizer state")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="lmpo compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="a train config YAML shared by every run")
    ap.add_argument("overrides", nargs="*", help="key=value overrides shared by every run")
    ap.add_argument("--algorithms", default="grpo,ppo", help="comma-separated presets (default grpo,ppo)")
    ap.add_argument("--output-dir", default="runs/compare")
    args = ap.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config] + overrides
    base = load_config(config, overrides)
    names = [a for a in args.algorithms.split(",") if a]
    from .algorithms import PRESETS

    for n in names:
        if n not in PRESETS:
            raise ConfigError(f"--algorithms: unknown preset '{n}'; allowed: {', '.join(PRESETS)}.")
    rows = compare_runs(base, names, args.output_dir)
    print(markdown_table(rows))
    print(f"\nwrote {args.output_dir}/compare.md, compare.json, compare.png")
    return 0
