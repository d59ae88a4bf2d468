"""The monitors on a deliberately exploitable reward (docs/monitoring.md).

    python bench/monitor_example.py [--model DIR] [--steps 40] [--output-dir runs/monitor_example]

Two GRPO runs from the same start (the embedded SFT model unless --model), identical but for the
reward: `longer` (a longer answer scores higher, right or wrong: the exploitable one) and
`addition_exact` (honest). Both use `monitor.verifier: addition_exact` and `monitor.action: warn`,
so they run to the end and every alarm is recorded. Prints each run's alarms and its monitor line,
and plots training reward, verifier accuracy, completion length and the reward-verifier divergence
with the alarms marked (OUTPUT/monitor_example.png).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LONGER = '''
def longer(prompts, completions, **kw):
    """Deliberately exploitable: a longer answer scores higher, right or wrong."""
    return [len(c) / 6 for c in completions]
'''


def main(argv=None) -> int:
    import torch

    from lmpo.config import load_config
    from lmpo.io.logging import read_metrics
    from lmpo.rl.monitors import monitor_line
    from lmpo.rl.loop import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--output-dir", default="runs/monitor_example")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "longer.py").write_text(LONGER)
    runs = {"exploitable (longer)": f"{out / 'longer.py'}:longer", "honest (addition_exact)": "addition_exact"}
    results = {}
    for label, reward in runs.items():
        d = out / label.split()[0]
        keys = [f"output_dir={d}", f"reward_funcs=[{reward}]", f"max_steps={args.steps}", "group_size=8",
                "prompts_per_step=8", "max_new_tokens=6", "learning_rate=3e-4", "beta=0", "threads=1",
                "progress=false", "save_steps=100000", "eval_samples=50", "monitor.verifier=addition_exact",
                "monitor.action=warn", "monitor.warmup_steps=5", "monitor.window=5", "monitor.patience=3"]
        if args.model:
            keys.append(f"model={args.model}")
        train(load_config(None, keys))
        alarms = [json.loads(x) for x in (d / "alarms.jsonl").read_text().splitlines()] if (d / "alarms.jsonl").exists() else []
        results[label] = (read_metrics(d), alarms)
        print(f"{label}: {monitor_line(d)}")
        for a in alarms:
            print(f"    step {a['step']}: {a['kind']} {a['rule']} = {a['value']:.3g} (threshold {a['threshold']})")
    plot(results, out / "monitor_example.png")
    print(f"wrote {out / 'monitor_example.png'}")
    return 0


def plot(results: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward/mean", "training reward"), ("monitor/verifier_mean", "verifier (addition_exact)"),
              ("completion/mean_length", "completion length"), ("monitor/reward_divergence", "reward − verifier gain (std units)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for label, (rows, alarms) in results.items():
        for ax, (key, title) in zip(axes, panels):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            for a in alarms:
                ax.axvline(a["step"], color=line.get_color(), ls=":", lw=1)
    axes[-1].axhline(1.0, color="gray", ls="--", lw=1)
    axes[0].legend(fontsize=8)
    fig.suptitle("dotted lines: alarms (the first is where monitor.action=stop would end the run)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
