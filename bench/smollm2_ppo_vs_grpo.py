"""GRPO, PPO with a separate critic and PPO with a shared value head on SmolLM2-135M-Instruct, the same
work for each: model-state memory, peak RSS, time per step (and its parts), reward per sample and per
second of training (docs/ppo_vs_grpo.md, issue 14.5).

    PYTHONPATH=. python bench/smollm2_ppo_vs_grpo.py                 # 5 steps each, table on stdout
    PYTHONPATH=. python bench/smollm2_ppo_vs_grpo.py --steps 3 --json bench/results/smollm2_ppo_vs_grpo.json

Each variant is ``lmpo train examples/smollm2_math/grpo.yaml`` (chat addition, 4 prompts × 8 samples,
≤ 24 new tokens, full fine-tuning in float32, AdamW, lr 5e-6, β 0) in its own process, so its peak RSS
is its own, with no held-out evaluation; PPO differs only in ``algorithm=ppo`` and ``ppo.critic``
(GAE with γ 1, λ 0.95; the separate critic is a copy of the policy with a zero-initialized scalar head,
the shared one a 577-parameter head on the policy's last hidden states, trained by the policy's optimizer).
Time per step is the median over steps after the first (``time/step_s``: rollout, reward, the extra
forwards, update, optimizer; model loading and the final save excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "smollm2_math" / "grpo.yaml"
VARIANTS = {
    "grpo": [],
    "ppo_separate": ["algorithm=ppo", "ppo.critic=separate"],
    "ppo_shared": ["algorithm=ppo", "ppo.critic=shared"],
}
PARTS = {"rollout": ("time/rollout_s",), "reward": ("time/reward_s",),
         "old log-probs + values": ("time/prepare/old_logp_s", "time/prepare/values_s", "time/prepare/ref_s",
                                    "time/logprob_s"),
         "update": ("time/update_s",), "optimizer": ("time/optimizer_s",)}


def run_variant(name: str, extra: list[str], out: Path, steps: int, overrides: list[str]) -> dict:
    from lmpo.compare import summarize
    from lmpo.io.logging import read_metrics

    run_dir = out / name
    args = [sys.executable, "-m", "lmpo", "train", str(CONFIG), *extra, f"max_steps={steps}", "eval_dataset=null",
            "progress=false", f"output_dir={run_dir}", "overwrite_output_dir=true", "save_steps=100000", *overrides]
    print("--", name, " ".join(args[3:]), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(args, env=env, check=True)
    row = summarize(name, run_dir)
    for saved in ("final", "checkpoints"):               # policy (+ critic) and optimizer: 2–4 GB a run, not needed here
        shutil.rmtree(run_dir / saved, ignore_errors=True)
    metrics = read_metrics(run_dir)[1:] or read_metrics(run_dir)
    row["parts_s"] = {part: statistics.median(sum(m.get(k, 0.0) for k in keys) for m in metrics)
                      for part, keys in PARTS.items()}
    rewards = [r for r in row["reward_curve"] if r is not None]
    row["reward_per_sample"] = sum(rewards) / len(rewards)
    # reward earned per second of training: the sum of rewards of all samples over the sum of step times
    row["reward_per_s"] = sum(rewards) * row["samples_per_step"] / row["train_s"]
    return row


def table(rows: list[dict]) -> str:
    base = rows[0]
    gib = lambda mib: f"{mib / 1024:.2f}"                                        # noqa: E731
    lines = ["| | " + " | ".join(r["algorithm"] for r in rows) + " |", "|---" + "|---:" * len(rows) + "|"]

    def add(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in rows) + " |")

    add("trained model state GiB (params + grads + AdamW)",
        lambda r: " + ".join(f"{k} {gib(v)}" for k, v in r["model_state_mib"].items()))
    add("model state / GRPO", lambda r: f"{sum(r['model_state_mib'].values()) / sum(base['model_state_mib'].values()):.2f}×")
    add("peak RSS GiB", lambda r: gib(r["peak_rss_mib"]))
    add("peak RSS / GRPO", lambda r: f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}×")
    add("median s / step", lambda r: f"{r['s_per_step']:.1f}")
    add("time per step / GRPO", lambda r: f"{r['s_per_step'] / base['s_per_step']:.2f}×")
    add("of which " + " / ".join(PARTS), lambda r: " / ".join(f"{v:.1f}" for v in r["parts_s"].values()))
    add("steps × samples", lambda r: f"{r['steps']} × {r['samples_per_step']}")
    add("training reward per step", lambda r: ", ".join(f"{x:.2f}" for x in r["reward_curve"]))
    add("reward per sample (mean over the run)", lambda r: f"{r['reward_per_sample']:.3f}")
    add("reward per second of training", lambda r: f"{r['reward_per_s']:.3f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="runs/smollm2_ppo_vs_grpo", help="run directories")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("overrides", nargs="*", help="key=value for every run (threads=1, model=DIR, ...)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    rows = [run_variant(n, VARIANTS[n], Path(a.out), a.steps, a.overrides) for n in a.variants.split(",")]
    text = table(rows)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps({"steps": a.steps, "overrides": a.overrides, "rows": rows,
                                            "table": text}, indent=2))


if __name__ == "__main__":
    main()
