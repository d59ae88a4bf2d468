"""lmpo's PPO vs TRL 1.12's PPOTrainer (the last TRL release with PPO) on the same work, on this CPU.

TRL 1.12 lives in its own environment (it pins nothing lmpo needs, and lmpo never imports it):

    python3 -m venv /work/venv-trl112
    /work/venv-trl112/bin/pip install torch==2.13.0 'trl==1.12.*'     # brings transformers, accelerate, datasets

    python bench/ppo_vs_trl.py --model runs/demo/sft                       # both, 150 steps each
    python bench/ppo_vs_trl.py --model runs/demo/sft --steps 30 --tools lmpo
    python bench/ppo_vs_trl.py --model runs/demo/sft --steps 40 --tools lmpo --set fused_adamw=true
    python bench/ppo_vs_trl.py --trl-python /path/to/venv/bin/python ...

The same work for both: the same SFT start as policy, reference and critic backbone, 64 prompts per
step with one sample each, 6 new tokens at temperature 1, k1 KL (β = 0.04) in the per-token reward,
GAE (γ = 1, λ = 0.95), whitened advantages, clip 0.2, value clip 0.2, vf_coef 0.1, one epoch of
one minibatch, lr 3e-5 for policy and critic, the exact-match reward of the addition task (for TRL,
whose PPOTrainer takes a reward *model*, a module that decodes each sequence and scores it). Each
run is its own process under ``bench/vs_trl.py``'s measuring parent (peak RSS of that run alone).
Step time: the median over steps after the first five; lmpo's from ``time/step_s``, TRL's between
consecutive ``on_step_end`` callbacks. Held-out greedy / sampled accuracy at the end, both with
``lmpo.stages.evaluate`` on the same 200 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = dict(prompts=64, new_tokens=6, lr=3e-5, beta=0.04, vf_coef=0.1, threads=1, seed=0)


def lmpo_cmd(model: str, out: Path, steps: int, extra: list[str] = ()) -> list[str]:
    w = WORK
    kv = dict(model=model, output_dir=out, algorithm="ppo", group_size=1, prompts_per_step=w["prompts"],
              max_new_tokens=w["new_tokens"], learning_rate=w["lr"], beta=w["beta"], max_steps=steps, epochs=1,
              minibatches=1, seed=w["seed"], threads=w["threads"], progress="false", save_steps=10**6, log_samples=0,
              **{"ppo.critic_init": "policy", "ppo.vf_coef": w["vf_coef"], "ppo.critic_learning_rate": w["lr"]})
    return [sys.executable, "-m", "lmpo", "train", *[f"{k}={v}" for k, v in kv.items()], *extra]


def run_trl(spec: dict):
    """TRL 1.12's PPOTrainer on WORK; writes ``out/trl.json`` (step times, rewards, final accuracy)."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from lmpo.data import addition_heldout, addition_rows
    from lmpo.rewards import addition_exact
    from lmpo.stages.evaluate import evaluate

    tok = AutoTokenizer.from_pretrained(spec["model"])
    rows = addition_rows(20000, seed=0)
    train = Dataset.from_list([{"input_ids": tok(r["prompt"])["input_ids"]} for r in rows])

    class ExactMatch(torch.nn.Module):
        """A 'reward model' for TRL's get_reward: the backbone returns, at every position, 1.0 when the
        decoded sequence's answer equals the sum (addition_exact on the decoded text), else 0."""
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = self._score_rows
            self.score = torch.nn.Identity()
            self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

        def _score_rows(self, input_ids, **_):
            texts = tok.batch_decode(input_ids, skip_special_tokens=True)
            prompts = [t.split("=")[0] + "=" for t in texts]
            answers = [str(sum(int(x) for x in p[:-1].split("+"))) for p in prompts]
            score = addition_exact(prompts, [t[len(p):] for t, p in zip(texts, prompts)], answer=answers)
            h = torch.tensor(score, dtype=torch.float32)[:, None, None].expand(-1, input_ids.shape[1], 1)
            return type("Out", (), {"hidden_states": [h]})()

    policy = AutoModelForCausalLM.from_pretrained(spec["model"])
    ref = AutoModelForCausalLM.from_pretrained(spec["model"])
    value = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1)
    value.config.pad_token_id = tok.pad_token_id
    args = PPOConfig(
        output_dir=spec["out"], use_cpu=True, bf16=False, fp16=False, report_to=[], logging_steps=1,
        save_strategy="no", disable_tqdm=True, seed=spec["seed"], per_device_train_batch_size=spec["prompts"],
        gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        total_episodes=spec["prompts"] * spec["steps"], local_rollout_forward_batch_size=spec["prompts"],
        response_length=spec["new_tokens"], stop_token="eos", temperature=1.0, missing_eos_penalty=None,
        learning_rate=spec["lr"], lr_scheduler_type="constant", kl_coef=spec["beta"], kl_estimator="k1",
        cliprange=0.2, cliprange_value=0.2, vf_coef=spec["vf_coef"], gamma=1.0, lam=0.95, whiten_rewards=False,
        num_sample_generations=0, max_grad_norm=1.0, dataloader_num_workers=0)

    class Probe(TrainerCallback):
        def __init__(self):
            self.times, self.t = [], None

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.times.append(now - self.t)
            self.t = now

    probe = Probe()
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=ExactMatch(),
                         train_dataset=train, value_model=value, callbacks=[probe])
    trainer.train()
    held = addition_heldout(200)
    kw = dict(max_new_tokens=spec["new_tokens"], seed=spec["seed"])
    final = {"eval/greedy_accuracy": evaluate(policy, tok, held, addition_exact, **kw)["accuracy"],
             "eval/sampled_accuracy": evaluate(policy, tok, held, addition_exact, temperature=1.0, **kw)["accuracy"]}
    rewards = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["out"]) / "trl.json").write_text(json.dumps({"step_s": probe.times, "rewards": rewards, "final": final}))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_trl":
        return run_trl(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the SFT start (e.g. runs/demo/sft)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--tools", default="lmpo,trl")
    p.add_argument("--trl-python", default="/work/venv-trl112/bin/python")
    p.add_argument("--root", default=str(ROOT / "runs" / "ppo_vs_trl"))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra lmpo train overrides for lmpo's run (e.g. fused_adamw=true)")
    a = p.parse_args(argv)
    from bench.vs_trl import run_measured
    from lmpo.io.logging import read_metrics

    root = Path(a.root)
    res = {}
    for tool in a.tools.split(","):
        out = root / tool
        if out.exists():
            import shutil

            shutil.rmtree(out)
        if tool == "lmpo":
            cmd = lmpo_cmd(a.model, out, a.steps, a.set)
        else:
            spec = dict(WORK, model=a.model, out=str(out), steps=a.steps)
            cmd = [a.trl_python, str(Path(__file__).resolve()), "_trl", json.dumps(spec)]
        print(f"{tool}: {' '.join(map(str, cmd))}", flush=True)
        meas = run_measured(cmd, out, WORK["threads"], root / f"{tool}.log")
        if tool == "lmpo":
            rows = read_metrics(out)
            steps = [r["time/step_s"] for r in rows]
            final = json.loads((out / "summary.json").read_text())
            parts = {k: statistics.median(r.get(k, 0.0) for r in rows[5:] or rows)
                     for k in rows[-1] if k.startswith("time/")}
        else:
            d = json.loads((out / "trl.json").read_text())
            steps, final, parts = d["step_s"], d["final"], {}
        res[tool] = {"s_per_step": statistics.median(steps[5:] or steps), "peak_rss_mib": meas["peak_rss_mib"],
                     "wall_s": meas["wall_s"], "greedy": final.get("eval/greedy_accuracy"),
                     "sampled": final.get("eval/sampled_accuracy"), **parts}
        print(json.dumps({tool: res[tool]}), flush=True)
    (root / "results.json").write_text(json.dumps(res, indent=2))
    if "lmpo" in res and "trl" in res:
        a_, b = res["lmpo"], res["trl"]
        print(f"\n| | lmpo | TRL 1.12 | lmpo / TRL |\n|---|---:|---:|---:|\n"
              f"| median s / step | {a_['s_per_step']:.3f} | {b['s_per_step']:.3f} | {a_['s_per_step'] / b['s_per_step']:.2f} |\n"
              f"| peak RSS MiB | {a_['peak_rss_mib']:.0f} | {b['peak_rss_mib']:.0f} | {a_['peak_rss_mib'] / b['peak_rss_mib']:.2f} |\n"
              f"| held-out greedy / sampled | {a_['greedy']:.3f} / {a_['sampled']:.3f} | {b['greedy']:.3f} / {b['sampled']:.3f} | |")


if __name__ == "__main__":
    main()
