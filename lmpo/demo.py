"""``lmpo demo`` (``make demo``): the whole pipeline on the embedded task, end to end, offline.

tiny model ─► SFT warm start ─► GRPO and PPO from the same SFT start, side by side (and, on the core
PPO frees, a reward model on preference pairs) ─► held-out greedy and sampled accuracy before and
after, PPO and GRPO compared at equal samples and at equal training time ─► runs/demo/summary.json,
compare.png + tables.

Every stage shows a progress bar with its live metric and ends with its elapsed time; every stage's
directory is made anew, so the demo can be run again and again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from lmpo.compare import budget_rows, compare_runs, markdown_table, write_report
from lmpo.config import Config, SFTConfig
from lmpo.data import addition_heldout
from lmpo.models.load import load_causal_lm, load_tokenizer, quiet_transformers
from lmpo.rewards import addition_exact
from lmpo.stages.evaluate import evaluate
from lmpo.rl.monitors import monitor_line
from lmpo.stages.reward_model import RMConfig, train_reward_model
from lmpo.stages.sft import train_sft

# The SFT warm start stops once greedy accuracy on validation rows (drawn from the training pool,
# never the held-out set) reaches 0.7: an imperfect start that leaves room for RL.
# GRPO and PPO then run side by side, one core each. GRPO: 32 prompts x 4 samples, lr 2e-4
# decayed to 0 (cosine), beta = 0. PPO: 128 prompts x 1 sample (a critic needs no group), lr 3e-4
# decayed to 0 (cosine), k1 KL (beta = 0.02) in the reward, a critic initialized from the SFT
# policy, one epoch, one minibatch. See docs/ppo_vs_grpo.md (the runs behind these choices).
FULL = dict(sft_steps=450, sft_stop=0.7, rm_steps=200, grpo_steps=1200, ppo_steps=300, eval_steps=100)
QUICK = dict(sft_steps=60, sft_stop=None, rm_steps=20, grpo_steps=10, ppo_steps=10, eval_steps=5)
GRPO = dict(group_size=4, prompts_per_step=32)
PPO = dict(group_size=1, prompts_per_step=128, learning_rate=3e-4, beta=0.02, ppo={"critic_init": "policy"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lmpo demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke test, no accuracy claim)")
    ap.add_argument("--output-dir", default="runs/demo")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("summary.json", "compare.json", "compare.md", "compare.png"):
        (out / stale).unlink(missing_ok=True)
    t0 = time.time()
    summary = run_demo(out, budget, args.threads)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    print(f"\nwrote {out / 'summary.json'}, {out / 'compare.png'}")
    return 0


class Stages:
    """Prints each stage's title, then its elapsed time when the next one starts."""

    def __init__(self):
        self.seconds: dict = {}
        self._name, self._t0 = None, 0.0

    def __call__(self, name: str, title: str):
        self.end()
        print(f"\n== {title}", flush=True)
        self._name, self._t0 = name, time.time()

    def end(self):
        if self._name is not None:
            self.seconds[self._name] = round(time.time() - self._t0, 1)
            print(f"== {self._name}: {self.seconds[self._name]:.0f} s", flush=True)
            self._name = None


def fresh(path: Path) -> Path:
    """A stage's directory, made anew (a rerun never mixes with the last run's files)."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def run_demo(out: Path, budget: dict, threads) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    quiet_transformers()                    # transformers' own "Writing model shards" bars: not a stage
    stage = Stages()

    def acc(model_dir):
        model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
        rows = addition_heldout()
        g = evaluate(model, tok, rows, addition_exact, max_new_tokens=6)["accuracy"]
        s = evaluate(model, tok, rows, addition_exact, max_new_tokens=6, temperature=1.0)["accuracy"]
        return g, s

    stage("sft", "SFT: tiny Llama, warm start on addition (bar: loss, validation accuracy)")
    sft_dir = fresh(out / "sft")
    sft = train_sft(SFTConfig(output_dir=str(sft_dir), max_steps=budget["sft_steps"], batch_size=256,
                              learning_rate=3e-3, warmup_steps=30, threads=threads,
                              eval_steps=25 if budget["sft_stop"] else 0, stop_at_accuracy=budget["sft_stop"]))
    sft_g, sft_s = acc(sft_dir)
    print(f"sft: {sft['steps']} steps × 256 pairs; held-out accuracy greedy {sft_g:.3f}, sampled {sft_s:.3f}")

    # GRPO and PPO side by side, each in its own process on its own core (one thread each). Neither
    # uses the reward model (their reward is the exact-match check), so it trains in this process on
    # the core the shorter PPO run frees, while GRPO goes on (one thread: the other core is GRPO's).
    base = Config(model=str(sft_dir), reward_funcs=["addition_exact"], max_new_tokens=6, beta=0.0,
                  learning_rate=2e-4, lr_schedule="cosine", threads=threads or 1, save_steps=100_000,
                  eval_steps=budget["eval_steps"], overwrite_output_dir=True)   # a rerun starts its runs anew
    rm: dict = {}
    stage("rl", "GRPO and PPO from the SFT start, side by side, one core each, then the reward model on the "
                "core PPO frees (bars: live reward, RM loss)")
    rows = compare_runs(base, ["grpo", "ppo"], out, steps={"grpo": budget["grpo_steps"], "ppo": budget["ppo_steps"]},
                        overrides={"grpo": GRPO, "ppo": PPO}, report=False, parallel=True,
                        after={"ppo": lambda: rm.update(reward_model(out / "rm", sft_dir, budget["rm_steps"]))})
    runs = dict(zip(("grpo", "ppo"), rows))
    stage("compare", "PPO vs GRPO at equal samples and equal training time")
    write_report(rows, out)
    stage.end()
    for name in ("grpo", "ppo"):                 # the monitors' state, one line per RL stage
        print(f"{name}: {monitor_line(out / name)}")
    return {   # the runs' final evaluation is acc()'s: the same 200 rows, greedy and T = 1 with seed 0
        "sft_accuracy": sft_g, "sft_sampled_accuracy": sft_s, "sft_steps": sft["steps"],
        "grpo_accuracy": runs["grpo"]["greedy_accuracy"], "grpo_sampled_accuracy": runs["grpo"]["sampled_accuracy"],
        "ppo_accuracy": runs["ppo"]["greedy_accuracy"], "ppo_sampled_accuracy": runs["ppo"]["sampled_accuracy"],
        "rm_pairwise_accuracy": rm.get("eval/accuracy"), "rm_seconds": rm.get("seconds"),
        "compare": rows,
        "compare_table": markdown_table(rows),
        "stage_seconds": stage.seconds,
    }


def reward_model(out: Path, sft_dir: Path, steps: int) -> dict:
    """The reward model from the SFT start, in this process with one thread (the other core runs GRPO);
    its metrics plus ``seconds``."""
    t0 = time.time()
    print("\n== reward model: Bradley-Terry on correct vs wrong answers, on the core PPO freed (bar: loss)", flush=True)
    rm = train_reward_model(RMConfig(model=str(sft_dir), output_dir=str(fresh(out)), threads=1, max_steps=steps,
                                     progress=True))
    rm["seconds"] = round(time.time() - t0, 1)
    print(f"== rm: {rm['seconds']:.0f} s; held-out pairwise accuracy {rm.get('eval/accuracy', float('nan')):.3f}",
          flush=True)
    return rm


def table(s: dict) -> str:
    """The held-out table, each row with the budget it used, then the comparison's tables."""
    def run_budget(r):
        e = r["evals"][-1] if r.get("evals") else {"step": r["steps"], "samples": r["steps"] * r["samples_per_step"]}
        return f"{e['step']} steps × {r['samples_per_step']} samples = {e['samples']:,} samples, {r['train_s']:.0f} s"

    rows = [("SFT (start)", f"{s.get('sft_steps', '?')} steps × 256 pairs", s["sft_accuracy"], s["sft_sampled_accuracy"])]
    by_name = {r["algorithm"]: r for r in s.get("compare", [])}
    for name, key in (("GRPO", "grpo"), ("PPO", "ppo")):
        budget = run_budget(by_name[key]) if key in by_name else ""
        rows.append((name, budget, s[f"{key}_accuracy"], s[f"{key}_sampled_accuracy"]))
    for b in budget_rows(s.get("compare", [])):
        if b["budget"] != "its own run" and "step" in b:
            rows.append((f"{b['algorithm'].upper()} at {b['budget'].split(' (')[0]}",
                         f"{b['step']} steps = {b['samples']:,} samples, {b['train_s']:.0f} s", b["greedy"], b["sampled"]))
    lines = ["", "held-out exact match (200 addition problems never trained on); s = training seconds", "",
             "| policy | budget | greedy | sampled (T=1) |", "|---|---|---|---|"]
    lines += [f"| {n} | {b} | {g:.3f} | {sm:.3f} |" for n, b, g, sm in rows]
    if s.get("rm_pairwise_accuracy") is not None:
        took = f" (trained in {s['rm_seconds']:.0f} s during the RL stage)" if s.get("rm_seconds") else ""
        lines.append(f"\nreward model held-out pairwise accuracy: {s['rm_pairwise_accuracy']:.3f}{took}")
    lines.append("\n" + s["compare_table"])
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in s.get("stage_seconds", {}).items())
    lines.append(f"\ntotal {s.get('seconds', 0):.0f} s ({stages})")
    return "\n".join(lines)
