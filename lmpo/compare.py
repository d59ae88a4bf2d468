"""``lmpo compare``: GRPO, PPO and any other presets on the same task, model, prompt budget, seed.

Each algorithm runs in its own process (so peak RSS is its own) with identical settings except the
preset; the table reports what was measured: peak process RSS, bytes of parameters + gradients +
optimizer state per model, median seconds per step, samples per second, the reward curve and
held-out accuracy, each run in full and cut to equal samples and to equal training time.
``compare.png`` plots reward and held-out accuracy against samples and against training seconds,
with each run's memory and time per step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from .config import Config, ConfigError, load_config, to_dict
from lmpo.io.logging import read_metrics
from lmpo.algorithms import PRESETS
from lmpo.config import parse_overrides


def _deep_update(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = _deep_update(dict(d.get(k) or {}), v) if isinstance(v, dict) else v
    return d


def compare_runs(base: Config, algorithms: list[str], out_dir, steps: dict | None = None,
                 overrides: dict | None = None, report: bool = True, parallel: bool = False,
                 after: dict | None = None) -> list[dict]:
    """Run each algorithm as ``python -m lmpo train`` in its own process (its progress bar with the
    live reward shows, unless ``base.progress`` is off); return one row each. Each run's directory
    is made anew. ``parallel``: all runs at once (one bar per run, read from its metrics.jsonl; give
    each run its own ``threads``). ``after``: {run name: function}, called in this process once that run has finished successfully
    (with ``parallel``, in a thread while the other runs go on: work for the core the run frees);
    this function returns when those calls have too, and re-raises the first error among them."""
    after = after or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")])}
    jobs = []
    for name in algorithms:
        cfg = _deep_update(to_dict(base), {"algorithm": name, "output_dir": str(out / name),
                                           "progress": base.progress and not parallel})
        if steps and name in steps:
            cfg["max_steps"] = steps[name]
        if overrides and name in overrides:
            _deep_update(cfg, overrides[name])
        shutil.rmtree(out / name, ignore_errors=True)              # a rerun starts this run's files anew
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"-- {name}: {cfg['max_steps']} steps × {cfg['prompts_per_step']} prompts × {cfg['group_size']} samples"
              f" (config {path})", flush=True)
        jobs.append((name, cfg, [sys.executable, "-m", "lmpo", "train", str(path)]))
    if parallel:
        procs = [subprocess.Popen(cmd, env=env) for _, _, cmd in jobs]
        threads = _watch([(name, Path(cfg["output_dir"]), cfg["max_steps"], p) for (name, cfg, _), p in zip(jobs, procs)],
                         base.progress, after)
        codes = [p.wait() for p in procs]
        for th in threads:
            th.join()
        errors = [th.error for th in threads if th.error is not None]
        if errors:
            raise errors[0]
    else:
        codes = []
        for name, _, cmd in jobs:
            t0 = time.time()
            codes.append(subprocess.run(cmd, env=env).returncode)
            print(f"-- {name}: done in {time.time() - t0:.0f} s", flush=True)
            if codes[-1] != 0:
                break
            if name in after:
                after[name]()
    for (name, _, _), code in zip(jobs, codes):
        if code != 0:
            raise RuntimeError(f"lmpo compare: the {name} run failed (exit {code}); see its output above.")
    rows = [summarize(name, Path(cfg["output_dir"])) for name, cfg, _ in jobs]
    if report:
        write_report(rows, out)
    return rows


def _watch(runs: list, progress: bool, after: dict | None = None, every: float = 0.5) -> list:
    """One progress bar per running process, with its live reward, from the lines its metrics.jsonl
    gains (read from where the last look stopped: re-reading a whole 1 200-step file twice a
    second cost the runs' cores seconds); returns when every process has exited, with the threads
    running ``after``'s functions, each started when its run exited with status 0."""
    from tqdm.auto import tqdm

    bars = [tqdm(total=total, desc=name, position=i, disable=not progress, dynamic_ncols=True)
            for i, (name, _, total, _) in enumerate(runs)]
    t0, done, tails, threads = time.time(), {}, [_Tail(run_dir / "metrics.jsonl") for _, run_dir, _, _ in runs], []
    while True:
        alive = [p.poll() is None for *_, p in runs]
        for bar, tail, (name, _, _, proc), up in zip(bars, tails, runs, alive):
            last = tail.read()
            if tail.lines > bar.n:
                bar.update(tail.lines - bar.n)
                r = (last or {}).get("reward/mean")
                bar.set_postfix(reward=f"{r:.4f}" if isinstance(r, (int, float)) else "nan", refresh=False)
            if not up and name not in done:
                done[name] = time.time() - t0
                if proc.returncode == 0 and after and name in after:
                    threads.append(_Thread(after[name]))
            bar.refresh()
        if not any(alive):
            break
        time.sleep(every)
    for bar in bars:
        bar.close()
    for name, seconds in done.items():
        print(f"-- {name}: done in {seconds:.0f} s", flush=True)
    return threads


class _Tail:
    """A growing JSON-lines file read incrementally: ``read()`` takes the complete lines added since
    the last call (a line being written waits for the next) and returns the last one parsed."""

    def __init__(self, path: Path):
        self.path, self.pos, self.lines = path, 0, 0

    def read(self) -> dict | None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return None
        end = data.rfind(b"\n") + 1
        new = [line for line in data[:end].splitlines() if line.strip()]
        self.pos += end
        self.lines += len(new)
        try:
            return json.loads(new[-1]) if new else None
        except json.JSONDecodeError:
            return None


class _Thread(threading.Thread):
    """``fn()`` in a started thread; an exception it raises is kept in ``error`` for the caller."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.error = fn, None
        self.start()

    def run(self):
        try:
            self.fn()
        except BaseException as e:        # re-raised by compare_runs once the runs are done
            self.error = e


def write_report(rows: list[dict], out: Path):
    """compare.json, compare.md (the tables) and compare.png (the curves) in ``out``."""
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    (out / "compare.md").write_text(markdown_table(rows) + "\n")
    plot(rows, out / "compare.png")


def summarize(name: str, run_dir: Path) -> dict:
    """One run's row: memory, time per step, and its curves against samples and training seconds
    (the sum of ``time/step_s``: evaluation and start-up excluded)."""
    metrics = read_metrics(run_dir)
    res = json.loads((run_dir / "summary.json").read_text())
    per_step = res["samples_per_step"]
    steps = [m["time/step_s"] for m in metrics][1:] or [m["time/step_s"] for m in metrics]
    rewards = [m.get("reward/mean") for m in metrics]
    k = max(1, min(20, len(rewards) // 2))
    mean = lambda xs: sum(x for x in xs if x is not None) / max(1, sum(x is not None for x in xs))  # noqa: E731
    step_s = statistics.median(steps)
    clock = list(itertools.accumulate(m["time/step_s"] for m in metrics))
    evals = [{"step": m["step"], "samples": m["step"] * per_step, "train_s": t,
              "greedy": m["eval/greedy_accuracy"], "sampled": m["eval/sampled_accuracy"]}
             for m, t in zip(metrics, clock) if "eval/greedy_accuracy" in m]
    return {
        "algorithm": name, "steps": len(metrics), "samples_per_step": per_step,
        "peak_rss_mib": res["peak_rss_mib"],
        "model_state_mib": res["model_state_mib"],
        "s_per_step": step_s,
        "samples_per_s": per_step / step_s,
        "reward_first": mean(rewards[:k]), "reward_last": mean(rewards[-k:]),
        "reward_curve": rewards, "clock_s": clock, "evals": evals,
        "greedy_accuracy": res.get("eval/greedy_accuracy"), "sampled_accuracy": res.get("eval/sampled_accuracy"),
        "train_s": clock[-1] if clock else 0.0, "wall_s": res["wall_s"],
    }


def at_budget(row: dict, samples: float | None = None, seconds: float | None = None) -> dict | None:
    """The run's last held-out evaluation within a budget of samples or training seconds."""
    ok = [e for e in row["evals"] if (samples is None or e["samples"] <= samples + 1e-9)
          and (seconds is None or e["train_s"] <= seconds * 1.001)]
    return ok[-1] if ok else None


def budget_rows(rows: list[dict]) -> list[dict]:
    """Each run in full, then each run cut to the other runs' smallest budget in samples and in
    training seconds (read off its evaluation curve), so runs are compared at equal samples and at
    equal wall-clock time."""
    out = [{"algorithm": r["algorithm"], "budget": "its own run", **(r["evals"][-1] if r["evals"] else {})}
           for r in rows]
    if len(rows) < 2:
        return out
    for key, label, unit in (("samples", "equal samples", ""), ("train_s", "equal training time", " s")):
        limit = min(r["evals"][-1][key] for r in rows if r["evals"])
        for r in rows:
            e = at_budget(r, **{("samples" if key == "samples" else "seconds"): limit})
            if e is not None and e is not r["evals"][-1]:
                out.append({"algorithm": r["algorithm"], "budget": f"{label} ({limit:.0f}{unit})", **e})
    return out


def markdown_table(rows: list[dict]) -> str:
    head = ("| algorithm | peak RSS MiB | params+grads+optim MiB | s/step (median) | samples/s | "
            "reward first→last | held-out greedy | held-out sampled | train s | wall s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        state = ", ".join(f"{k} {v:.1f}" for k, v in r["model_state_mib"].items())
        lines.append(f"| {r['algorithm']} | {r['peak_rss_mib']:.0f} | {state} | {r['s_per_step']:.3f} | "
                     f"{r['samples_per_s']:.0f} | {r['reward_first']:.3f} → {r['reward_last']:.3f} | "
                     f"{_f(r['greedy_accuracy'])} | {_f(r['sampled_accuracy'])} | {r.get('train_s', 0):.0f} | "
                     f"{r['wall_s']:.0f} |")
    if len(rows) >= 2:
        a, b = rows[0], rows[1]
        ratio_mem = b["peak_rss_mib"] / a["peak_rss_mib"]
        sa, sb = sum(a["model_state_mib"].values()), sum(b["model_state_mib"].values())
        lines.append(f"\n{b['algorithm']} / {a['algorithm']}: peak RSS ×{ratio_mem:.2f}, model state ×{sb / sa:.2f}, "
                     f"time per step ×{b['s_per_step'] / a['s_per_step']:.2f}")
    if any(r.get("evals") for r in rows):
        lines += ["", "| algorithm | budget | steps | samples | train s | held-out greedy | held-out sampled |",
                  "|---|---|---|---|---|---|---|"]
        for b in budget_rows(rows):
            if "step" in b:
                lines.append(f"| {b['algorithm']} | {b['budget']} | {b['step']} | {b['samples']} | {b['train_s']:.0f} | "
                             f"{b['greedy']:.3f} | {b['sampled']:.3f} |")
    return "\n".join(lines)


def _f(x):
    return "—" if x is None else f"{x:.3f}"


def plot(rows: list[dict], path: Path):
    """Reward (moving average) and held-out accuracy against samples and against training seconds,
    and each run's memory and time per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, r in enumerate(rows):
        c = f"C{i}"
        curve = [x if x is not None else float("nan") for x in r["reward_curve"]]
        k = 20
        smooth = [sum(curve[max(0, j - k + 1):j + 1]) / len(curve[max(0, j - k + 1):j + 1]) for j in range(len(curve))]
        n = r["samples_per_step"]
        for ax, xs, ex in ((axes[0], [(j + 1) * n for j in range(len(curve))], "samples"),
                           (axes[1], r["clock_s"], "train_s")):
            ax.plot(xs, smooth, color=c, alpha=0.5, label=f"{r['algorithm']} reward ({k}-step mean)")
            if r["evals"]:
                ax.plot([e[ex] for e in r["evals"]], [e["greedy"] for e in r["evals"]], "o-", color=c,
                        label=f"{r['algorithm']} held-out greedy")
                ax.plot([e[ex] for e in r["evals"]], [e["sampled"] for e in r["evals"]], "s--", color=c,
                        label=f"{r['algorithm']} held-out sampled")
    axes[0].set_xlabel("samples")
    axes[1].set_xlabel("training seconds (evaluation excluded)")
    for ax, title in ((axes[0], "at equal samples"), (axes[1], "at equal wall-clock time")):
        ax.set_ylabel("reward / accuracy")
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    names = [r["algorithm"] for r in rows]
    x = range(len(rows))
    ax = axes[2]
    ax.bar([i - 0.2 for i in x], [r["peak_rss_mib"] for r in rows], 0.4, color="tab:gray", label="peak RSS MiB")
    ax.bar([i + 0.2 for i in x], [sum(r["model_state_mib"].values()) for r in rows], 0.4, color="tab:blue",
           label="params+grads+optim MiB")
    for i, r in enumerate(rows):
        ax.text(i, r["peak_rss_mib"], f"{r['s_per_step'] * 1000:.0f} ms/step", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MiB")
    ax.set_title("memory (label: median time per step)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="lmpo compare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?", help="a train config YAML shared by every run")
    ap.add_argument("overrides", nargs="*", help="key=value overrides shared by every run; ALGO:key=value for one "
                                                 "run only (ppo:group_size=1)")
    ap.add_argument("--algorithms", default="grpo,ppo", help="comma-separated presets (default grpo,ppo)")
    ap.add_argument("--output-dir", default="runs/compare")
    ap.add_argument("--parallel", action="store_true", help="all runs at once (give each its own threads=N)")
    args = ap.parse_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:
        config, overrides = None, [config] + overrides
    names = [a for a in args.algorithms.split(",") if a]
    for n in names:
        if n not in PRESETS:
            raise ConfigError(f"--algorithms: unknown preset '{n}'; allowed: {', '.join(PRESETS)}.")
    own = {n: [o.split(":", 1)[1] for o in overrides if o.split(":", 1)[0] == n] for n in names}
    shared = [o for o in overrides if o.split(":", 1)[0] not in PRESETS or "=" in o.split(":", 1)[0]]
    base = load_config(config, shared)
    if not base.eval_steps:                     # held-out curves for the plot: ten points per run
        base.eval_steps = max(1, base.max_steps // 10)
    for n in names:                             # each run's own keys, checked before anything runs
        load_config(config, shared + [f"algorithm={n}"] + own[n])
    rows = compare_runs(base, names, args.output_dir, overrides={n: parse_overrides(own[n]) for n in names},
                        parallel=args.parallel)
    print(markdown_table(rows))
    print(f"\nwrote {args.output_dir}/compare.md, compare.json, compare.png")
    return 0
