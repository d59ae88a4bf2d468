"""The reward curves of the SmolLM2 examples (docs/real_model.md): reward per step and against training
time, GRPO and PPO, from their metrics.jsonl.

    PYTHONPATH=. python bench/smollm2_curves.py runs/smollm2_grpo runs/smollm2_ppo --out docs/img/smollm2_math.png
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmpo.io.logging import read_metrics

    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="docs/img/smollm2_math.png")
    p.add_argument("--window", type=int, default=5, help="moving-average window (steps)")
    p.add_argument("--title", default="SmolLM2-135M-Instruct, chat addition, 2 CPU cores (shared)")
    p.add_argument("--ylabel", default="training reward (mean of 32 samples)")
    p.add_argument("--metric", default="reward/mean", help="the metrics.jsonl key to plot, e.g. reward/code_tests/mean")
    a = p.parse_args(argv)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in a.runs:
        rows = read_metrics(Path(run))
        steps = [r["step"] if "step" in r else i + 1 for i, r in enumerate(rows)]
        rew = [r[a.metric] for r in rows]
        t, acc = [], 0.0
        for r in rows:
            acc += r.get("time/step_s", 0.0)
            t.append(acc / 60)
        w = a.window
        avg = [sum(rew[max(0, i - w + 1):i + 1]) / len(rew[max(0, i - w + 1):i + 1]) for i in range(len(rew))]
        name = Path(run).name
        line, = ax1.plot(steps, rew, alpha=0.3)
        ax1.plot(steps, avg, color=line.get_color(), label=f"{name} ({w}-step mean)")
        ax2.plot(t, avg, color=line.get_color(), label=name)
    ax1.set_xlabel("step"), ax1.set_ylabel(a.ylabel), ax1.legend()
    ax2.set_xlabel("training time, minutes (sum of step times)"), ax2.set_ylabel("reward, moving mean"), ax2.legend()
    fig.suptitle(a.title)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(a.out)


if __name__ == "__main__":
    main()
