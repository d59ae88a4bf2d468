"""Each of lmpo's optional fast paths, measured against the plain float32 run on the same work.

    python bench/fast_paths.py                      # small size, all variants, one table
    python bench/fast_paths.py --size large --steps 30 --variants base,bf16

Every variant is a separate ``lmpo train`` process on the SFT start and settings of
``bench/vs_trl.py`` (same prompts per step, group size, new tokens, lr, beta 0, seed, threads),
run one after another, measured the same way (median step time after warm-up, peak RSS of the
process, reward and held-out accuracy at the end). Only lmpo runs; TRL is not involved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402  (the same SFT starts, commands and measuring process)

VARIANTS = {
    "base": [],                                          # float32, HF forward, full fine-tuning
    "bf16": ["dtype=bfloat16"],                          # bf16 autocast (training and sampling)
    "compile": ["compile=true"],                         # torch.compile(dynamic=True) of the policy
    "grad_ckpt": ["gradient_checkpointing=true"],        # activations recomputed in backward
    "lora": ["lora_r=8"],                                # peft LoRA r=8 on every linear layer
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=list(vs_trl.SIZES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=str(vs_trl.ROOT / "runs" / "fast_paths"))
    p.add_argument("--models", default=str(vs_trl.ROOT / "runs" / "bench_vs_trl" / "models"))
    a = p.parse_args(argv)
    from lmpo.io.logging import read_metrics

    root = Path(a.root)
    model = vs_trl.sft_start(a.size, Path(a.models), a.threads)
    results = {}
    for name in a.variants.split(","):
        ns = argparse.Namespace(steps=a.steps, eval_every=a.eval_every, threads=a.threads, seed=a.seed,
                                dtype="float32", set=VARIANTS[name])
        out = root / f"{a.size}-{name}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        cmd = vs_trl.lmpo_cmd(a.size, model, out, ns)
        print(f"[{name}] {' '.join(map(str, cmd))}", flush=True)
        meas = vs_trl.run_measured(cmd, out, a.threads, root / f"{a.size}-{name}.log")
        rows = read_metrics(out)
        res = vs_trl.summarize(rows, json.loads((out / "summary.json").read_text()), meas, a.warmup)
        tail = rows[a.warmup:] or rows
        for phase in ("update", "optimizer", "logprob"):
            res[f"{phase}_s_per_step"] = statistics.median([r.get(f"time/{phase}_s", 0.0) for r in tail])
        res["first_step_s"] = rows[0]["time/step_s"]
        results[name] = res
        print(f"[{name}] {json.dumps(res)}", flush=True)
    (root / f"{a.size}-results.json").write_text(json.dumps(results, indent=2))
    base = results.get("base")
    cols = [("s_per_step", "s/step", "{:.4f}"), ("rollout_s_per_step", "rollout s", "{:.4f}"),
            ("update_s_per_step", "update s", "{:.4f}"), ("optimizer_s_per_step", "optimizer s", "{:.4f}"),
            ("first_step_s", "first step s", "{:.2f}"), ("wall_s", "wall s", "{:.1f}"),
            ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("reward_last20", "reward last 20", "{:.3f}"),
            ("greedy_acc", "greedy acc", "{:.3f}"), ("sampled_acc", "sampled acc", "{:.3f}")]
    print("| variant | " + " | ".join(c[1] for c in cols) + " | s/step vs base |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for name, r in results.items():
        ratio = f"{r['s_per_step'] / base['s_per_step']:.2f}" if base else "–"
        print(f"| {name} | " + " | ".join(f.format(r[k]) if r.get(k) is not None else "–" for k, _, f in cols)
              + f" | {ratio} |")


if __name__ == "__main__":
    main()
