"""``lmpo demo`` (``make demo``): the whole pipeline on the embedded task, end to end, offline.

tiny model ─► SFT warm start ─► reward model on preference pairs ─► GRPO and PPO from the same SFT
start ─► held-out greedy and sampled accuracy before and after ─► runs/demo/summary.json + table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# The SFT warm start stops once greedy accuracy on validation rows (drawn from the training pool,
# never the held-out set) reaches 0.4: an imperfect start that leaves room for RL.
FULL = dict(sft_steps=450, sft_stop=0.4, grpo_steps=1200, ppo_steps=200, rm_steps=200)
QUICK = dict(sft_steps=60, sft_stop=None, grpo_steps=10, ppo_steps=10, rm_steps=20)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="lmpo demo", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a few steps of each stage (a smoke test, no accuracy claim)")
    ap.add_argument("--output-dir", default="runs/demo")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    summary = run_demo(out, budget, args.threads)
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    print(f"\nwrote {out / 'summary.json'}")
    return 0


def run_demo(out: Path, budget: dict, threads) -> dict:
    import torch

    from .compare import compare_runs, markdown_table
    from .config import Config, SFTConfig
    from .data import addition_heldout
    from .models.load import load_causal_lm, load_tokenizer
    from .rewards import addition_exact
    from .train.evaluate import evaluate
    from .train.sft import train_sft

    if threads:
        torch.set_num_threads(threads)
    stages = {}

    def stage(name):
        print(f"\n== {name}", flush=True)
        stages[name] = time.time()

    def acc(model_dir):
        model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
        rows = addition_heldout()
        g = evaluate(model, tok, rows, addition_exact, max_new_tokens=6)["accuracy"]
        s = evaluate(model, tok, rows, addition_exact, max_new_tokens=6, temperature=1.0)["accuracy"]
        return g, s

    stage("sft: tiny Llama, warm start on addition")
    sft_dir = out / "sft"
    train_sft(SFTConfig(output_dir=str(sft_dir), max_steps=budget["sft_steps"], batch_size=256, learning_rate=3e-3,
                        warmup_steps=30, threads=threads, eval_steps=25 if budget["sft_stop"] else 0,
                        stop_at_accuracy=budget["sft_stop"]))
    sft_g, sft_s = acc(sft_dir)
    print(f"sft held-out accuracy: greedy {sft_g:.3f}, sampled {sft_s:.3f}")

    stage("reward model: Bradley-Terry on correct vs wrong answers")
    from .train.reward_model import RMConfig, train_reward_model

    rm = train_reward_model(RMConfig(model=str(sft_dir), output_dir=str(out / "rm"), max_steps=budget["rm_steps"],
                                     progress=True))

    stage("GRPO and PPO from the same SFT start")
    base = Config(model=str(sft_dir), reward_funcs=["addition_exact"], max_new_tokens=6, beta=0.0,
                  group_size=8, prompts_per_step=16, learning_rate=1e-4, threads=threads, save_steps=10_000,
                  overwrite_output_dir=True)                    # a rerun of the demo starts its runs anew
    # PPO: the InstructGPT recipe (k1 KL in the reward, a critic initialized from the reward model,
    # 2 epochs x 2 minibatches); fewer steps than GRPO to keep the demo within 10 minutes.
    runs = compare_runs(base, ["grpo", "ppo"], out, steps={"grpo": budget["grpo_steps"], "ppo": budget["ppo_steps"]},
                        overrides={"ppo": {"beta": 0.02, "epochs": 2, "minibatches": 2,
                                           "ppo": {"critic_init": str(out / "rm")}}})
    res = {name: acc(out / name / "final") for name in ("grpo", "ppo")}
    return {
        "sft_accuracy": sft_g, "sft_sampled_accuracy": sft_s,
        "grpo_accuracy": res["grpo"][0], "grpo_sampled_accuracy": res["grpo"][1],
        "ppo_accuracy": res["ppo"][0], "ppo_sampled_accuracy": res["ppo"][1],
        "rm_pairwise_accuracy": rm.get("eval/accuracy"),
        "compare": runs,
        "compare_table": markdown_table(runs),
        "stage_seconds": {k: round(v, 1) for k, v in _durations(stages).items()},
    }


def _durations(stages: dict) -> dict:
    names = list(stages)
    ends = [stages[n] for n in names[1:]] + [time.time()]
    return {n: e - stages[n] for n, e in zip(names, ends)}


def table(s: dict) -> str:
    rows = [("SFT (start)", s["sft_accuracy"], s["sft_sampled_accuracy"]),
            ("GRPO", s["grpo_accuracy"], s["grpo_sampled_accuracy"]),
            ("PPO", s["ppo_accuracy"], s["ppo_sampled_accuracy"])]
    lines = ["", "held-out exact match (200 addition problems never trained on)", "",
             "| policy | greedy | sampled (T=1) |", "|---|---|---|"]
    lines += [f"| {n} | {g:.3f} | {sm:.3f} |" for n, g, sm in rows]
    if s.get("rm_pairwise_accuracy") is not None:
        lines.append(f"\nreward model held-out pairwise accuracy: {s['rm_pairwise_accuracy']:.3f}")
    lines.append("\n" + s["compare_table"])
    lines.append(f"\ntotal {s.get('seconds', 0):.0f} s")
    return "\n".join(lines)
