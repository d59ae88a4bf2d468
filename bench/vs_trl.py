"""lmpo vs TRL's GRPOTrainer, side by side on this machine (CPU).

    python bench/vs_trl.py                       # prepare SFT starts (cached), run both sizes, print tables
    python bench/vs_trl.py --sizes small --steps 60
    python bench/vs_trl.py prepare               # only build / SFT the starting checkpoints
    python bench/vs_trl.py --sizes smollm2 --warmup 2      # SmolLM2-135M-Instruct (lmpo fetch-model smollm2)
    python bench/vs_trl.py --sizes smollm2-random,qwen05b-random --dtype bfloat16   # on a GPU: random weights

The real-model sizes use the chat math task (``examples/smollm2_math``, reward ``math_answer``) and no
held-out evaluation; ``*-random`` sizes take SmolLM2's tokenizer and config (from ``--base``, default the
``lmpo fetch-model smollm2`` directory) with random weights, so every completion runs to the token limit and
both tools do exactly the same work.

Both tools start from the same SFT checkpoint, with the same prompts per step, group size, max new
tokens, learning rate (constant), beta = 0, clip 0.2, per-sequence token-mean loss, group-normalized
advantages, temperature 1.0, steps, seed and CPU threads. Each run is its own subprocess, wrapped by
a small measuring process (``_measure``) so peak RSS (getrusage RUSAGE_CHILDREN) and CPU time are
that run's alone. TRL is the optional ``bench`` extra (``pip install 'lmpo[bench]'``), never a runtime
dependency of lmpo. Held-out accuracy for both is ``lmpo.stages.evaluate.evaluate`` on the same 200
held-out rows (greedy, and sampled at temperature 1.0 with the run's seed), every ``--eval-every``
steps; time-to-accuracy counts training step time only (evaluation and process start excluded, for
both).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # the small setting: the embedded ~1 M Llama, 4 prompts x 8 samples, 8 new tokens
    "small": dict(model=dict(hidden_size=128, num_layers=4, intermediate_size=512),
                  sft=dict(learning_rate=3e-3, max_steps=3000, eval_steps=100),
                  prompts=4, group=8, new_tokens=8, lr=3e-5, steps=200, eval_every=20),
    # ~10 M Llama, 16 prompts x 16 samples, 32 new tokens
    "large": dict(model=dict(hidden_size=320, num_layers=6, intermediate_size=1280),
                  sft=dict(learning_rate=1e-3, max_steps=2000, eval_steps=20),   # stop close to SFT_STOP
                  prompts=16, group=16, new_tokens=32, lr=3e-5, steps=100, eval_every=10),
}
# real-model sizes: ``base`` is the SmolLM2 directory (--base); ``random`` re-initializes the weights
# (seed 0) with ``arch`` overriding its config; no SFT start, no held-out evaluation
QWEN2_05B = dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True)
SIZES.update({
    "smollm2": dict(base=True, prompts=2, group=4, new_tokens=64, lr=1e-6, steps=8, eval_every=0),
    "smollm2-random": dict(base=True, random=True, prompts=16, group=8, new_tokens=128, lr=1e-6, steps=5, eval_every=0),
    "qwen05b-random": dict(base=True, random=True, arch=QWEN2_05B, prompts=16, group=8, new_tokens=128, lr=1e-6,
                           steps=5, eval_every=0),
})
SFT_STOP = 0.55   # SFT until greedy validation accuracy reaches this: RL then has room to reach 0.6 sampled
TARGET = 0.6


# ----------------------------------------------------------------------------- SFT starts


def chat_math_file(root: Path) -> Path:
    """The chat math training rows (``examples/smollm2_math``) as a jsonl both tools read."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smollm2_math", ROOT / "examples" / "smollm2_math" / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = root / "chat_math_train.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in mod.rows()[0]))
    return out


def real_start(size: str, models: Path, base: str) -> Path:
    """A real-size model directory: the SmolLM2 directory itself, or its tokenizer with random weights
    (seed 0) in its architecture or ``arch``'s (built once under ``models``)."""
    spec = SIZES[size]
    if not base:
        from lmpo.models.load import fetch_model

        base = str(fetch_model("smollm2", install=False))
    if not spec.get("random"):
        return Path(base)
    out = models / size
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(base)
    if spec.get("arch"):
        arch = dict(spec["arch"])
        cfg = AutoConfig.for_model(arch.pop("model_type"), vocab_size=cfg.vocab_size, bos_token_id=cfg.bos_token_id,
                                   eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, **arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
    tmp.rename(out)
    return out


def sft_start(size: str, models: Path, threads: int, base: str = "") -> Path:
    """The SFT checkpoint both tools start from (built once, cached under ``models``)."""
    if SIZES[size].get("base"):
        return real_start(size, models, base)
    out = models / f"{size}-sft"
    if (out / "config.json").exists():
        return out
    from lmpo.config import SFTConfig
    from lmpo.models.tiny import build_tiny
    from lmpo.stages.sft import train_sft

    spec = SIZES[size]
    init = build_tiny(models / f"{size}-init", **spec["model"])
    tmp = out.with_name(out.name + ".tmp")
    cfg = SFTConfig(model=str(init), output_dir=str(tmp), stop_at_accuracy=SFT_STOP,
                    threads=threads, progress=False, **spec["sft"])
    m = train_sft(cfg)
    print(f"[{size}] SFT: {m['steps']} steps, {m['seconds']} s, last val {m['history'][-1] if m['history'] else None}")
    tmp.rename(out)
    return out


def start_accuracy(model_dir: Path, size: str, seed: int) -> dict:
    """Held-out greedy and sampled accuracy of the SFT start (the evaluator both runs use), cached."""
    cache = model_dir / f"start_eval_seed{seed}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from lmpo.data import addition_heldout
    from lmpo.models.load import load_causal_lm, load_tokenizer
    from lmpo.rewards import addition_exact
    from lmpo.stages.evaluate import evaluate

    m, tok = load_causal_lm(str(model_dir), trainable=False), load_tokenizer(str(model_dir))
    kw = dict(max_new_tokens=SIZES[size]["new_tokens"], seed=seed)
    res = {"greedy": evaluate(m, tok, addition_heldout(200), addition_exact, **kw)["accuracy"],
           "sampled": evaluate(m, tok, addition_heldout(200), addition_exact, temperature=1.0, **kw)["accuracy"]}
    cache.write_text(json.dumps(res))
    return res


def n_params(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(model_dir)).parameters())


# ----------------------------------------------------------------------------- the two runs


def lmpo_cmd(size: str, model: Path, out: Path, a) -> list[str]:
    s = SIZES[size]
    kv = dict(model=model, output_dir=out, prompts_per_step=s["prompts"], group_size=s["group"],
              max_new_tokens=s["new_tokens"], learning_rate=s["lr"], beta=0, max_steps=a.steps or s["steps"],
              seed=a.seed, threads=a.threads, eval_steps=a.eval_every or s["eval_every"], progress="false",
              save_steps=10**6, log_samples=0, dtype=a.dtype)
    if s.get("base"):
        kv.update(dataset=a.chat_math, reward_funcs="[math_answer]")
    return [sys.executable, "-m", "lmpo", "train", *[f"{k}={v}" for k, v in kv.items()], *a.set]


def trl_cmd(size: str, model: Path, out: Path, a) -> list[str]:
    s = SIZES[size]
    spec = dict(model=str(model), out=str(out), prompts=s["prompts"], group=s["group"], new_tokens=s["new_tokens"],
                lr=s["lr"], steps=a.steps or s["steps"], seed=a.seed, threads=a.threads,
                eval_every=a.eval_every or s["eval_every"], dtype=a.dtype,
                dataset=str(a.chat_math) if s.get("base") else None)
    return [sys.executable, str(Path(__file__).resolve()), "_trl", json.dumps(spec)]


def run_trl(spec: dict):
    """TRL's GRPOTrainer with the lmpo run's settings; writes ``out/trl.json`` (per-step times, rewards, evals)."""
    import torch

    torch.set_num_threads(spec["threads"])
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lmpo.data import addition_heldout, addition_rows
    from lmpo.models.load import load_tokenizer
    from lmpo.rewards import addition_exact, math_answer
    from lmpo.stages.evaluate import evaluate

    G, P, T, K = spec["group"], spec["prompts"], spec["new_tokens"], spec["eval_every"]
    if spec.get("dataset"):     # the chat math task: TRL renders the chat prompts with the same template
        reward = math_answer
        train = Dataset.from_list([json.loads(line) for line in open(spec["dataset"])])
    else:
        reward = addition_exact
        train = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in addition_rows(20000, seed=0)])
    heldout = addition_heldout(200)
    cuda = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(spec["model"])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    eval_tok = load_tokenizer(spec["model"])
    args = GRPOConfig(
        output_dir=spec["out"], use_cpu=not cuda, bf16=spec.get("dtype") == "bfloat16", fp16=False, report_to=[], logging_steps=1,
        save_strategy="no", disable_tqdm=True, gradient_checkpointing=False, dataloader_num_workers=0,
        num_generations=G, per_device_train_batch_size=P * G, gradient_accumulation_steps=1,  # one generation
        max_completion_length=T, learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,  # batch of P x G
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        temperature=1.0, top_p=1.0, top_k=0, num_iterations=1, max_steps=spec["steps"], seed=spec["seed"])

    def held_out(m) -> dict:
        kw = dict(max_new_tokens=T, seed=spec["seed"])
        greedy = evaluate(m, eval_tok, heldout, addition_exact, **kw)["accuracy"]
        sampled = evaluate(m, eval_tok, heldout, addition_exact, temperature=1.0, **kw)["accuracy"]
        return {"eval/greedy_accuracy": greedy, "eval/sampled_accuracy": sampled}

    class Probe(TrainerCallback):
        def __init__(self):
            self.rows, self.gen, self.t0, self.final = [], 0.0, 0.0, {}

        def on_step_begin(self, args, state, control, **kw):
            self.gen, self.t0 = 0.0, time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            row = {"step": state.global_step, "time/step_s": time.perf_counter() - self.t0, "time/rollout_s": self.gen}
            if K and state.global_step % K == 0:
                row.update(held_out(model))
            self.rows.append(row)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs and self.rows:
                self.rows[-1]["reward/mean"] = logs["reward"]

        def on_train_end(self, args, state, control, model=None, **kw):
            self.final = held_out(model) if K else {}

    probe = Probe()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=train,
                          processing_class=tok, callbacks=[probe])
    generate = trainer._generate

    def timed_generate(*a, **k):  # generation time per step (tokenize + generate + decode)
        t0 = time.perf_counter()
        r = generate(*a, **k)
        probe.gen += time.perf_counter() - t0
        return r

    trainer._generate = timed_generate
    trainer.train()
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    (Path(spec["out"]) / "trl.json").write_text(json.dumps({"steps": probe.rows, "final": probe.final}))


def measure(out_json: str, cmd: list[str]):
    """Run ``cmd`` as this process's only child; record its wall time, CPU time and peak RSS."""
    import resource

    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(out_json).write_text(json.dumps({"rc": rc, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
                                          "peak_rss_mib": ru.ru_maxrss / 1024}))
    sys.exit(rc)


def run_measured(cmd: list[str], out: Path, threads: int, log: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    out.mkdir(parents=True, exist_ok=True)
    m = out / "measure.json"
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, str(Path(__file__).resolve()), "_measure", str(m), "--", *cmd],
                             env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise SystemExit(f"run failed (exit {rc}); see {log}")
    return json.loads(m.read_text())


# ----------------------------------------------------------------------------- results


def summarize(rows: list[dict], final: dict, meas: dict, warmup: int) -> dict:
    steps = [r["time/step_s"] for r in rows]
    rewards = [r["reward/mean"] for r in rows if r.get("reward/mean") is not None]
    train_s, reach = 0.0, None
    for r in rows:
        train_s += r["time/step_s"]
        if reach is None and r.get("eval/sampled_accuracy", 0.0) >= TARGET:
            reach = (train_s, r["step"])
    return {
        "s_per_step": statistics.median(steps[warmup:] or steps),
        "rollout_s_per_step": statistics.median([r.get("time/rollout_s", 0.0) for r in rows[warmup:] or rows]),
        "rest_s_per_step": statistics.median([r["time/step_s"] - r.get("time/rollout_s", 0.0) for r in rows[warmup:] or rows]),
        "train_s": sum(steps),
        "wall_s": meas["wall_s"],
        "cpu_pct": 100 * meas["cpu_s"] / meas["wall_s"],
        "peak_rss_mib": meas["peak_rss_mib"],
        "reward_first20": statistics.mean(rewards[:20]),
        "reward_last20": statistics.mean(rewards[-20:]),
        "greedy_acc": final.get("eval/greedy_accuracy"),
        "sampled_acc": final.get("eval/sampled_accuracy"),
        "train_s_to_target": reach[0] if reach else None,
        "step_to_target": reach[1] if reach else None,
        "best_sampled_acc": max([r["eval/sampled_accuracy"] for r in rows if "eval/sampled_accuracy" in r] + [0.0]),
    }


ROWS = [("s_per_step", "median s / step (after warm-up)", "{:.4f}"),
        ("rollout_s_per_step", "  of which generation s", "{:.4f}"),
        ("rest_s_per_step", "  the rest (reward, log-probs, update, optimizer) s", "{:.4f}"),
        ("train_s", "sum of step times s", "{:.1f}"),
        ("wall_s", "whole-process wall s (incl. start, evals)", "{:.1f}"),
        ("cpu_pct", "CPU % (user+sys / wall)", "{:.0f}"),
        ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
        ("reward_first20", "reward, first 20 steps mean", "{:.3f}"),
        ("reward_last20", "reward, last 20 steps mean", "{:.3f}"),
        ("greedy_acc", "held-out greedy accuracy (end)", "{:.3f}"),
        ("sampled_acc", "held-out sampled accuracy (end)", "{:.3f}"),
        ("best_sampled_acc", "best periodic sampled accuracy", "{:.3f}"),
        ("train_s_to_target", f"train s to sampled acc >= {TARGET}", "{:.1f}")]


def table(size: str, title: str, lm: dict, tr: dict) -> str:
    def fmt(v, f):
        return "not reached" if v is None else f.format(v)

    lines = [f"### {size}: {title}", "", "| | lmpo | TRL | lmpo / TRL |", "|---|---:|---:|---:|"]
    for key, name, f in ROWS:
        a, b = lm.get(key), tr.get(key)
        if a is None and b is None and key != "train_s_to_target":
            continue
        ratio = f"{a / b:.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "–"
        lines.append(f"| {name} | {fmt(a, f)} | {fmt(b, f)} | {ratio} |")
    return "\n".join(lines)


def bench_size(size: str, a, root: Path) -> str:
    from lmpo.io.logging import read_metrics

    s = SIZES[size]
    model = sft_start(size, Path(a.models or root / "models"), a.threads, a.base)
    steps = a.steps or s["steps"]
    title = (f"{n_params(model) / 1e6:.1f} M params, {s['prompts']} prompts x {s['group']} samples, "
             f"{s['new_tokens']} new tokens, lr {s['lr']}, beta 0, {steps} steps, threads {a.threads}, seed {a.seed}")
    if s.get("eval_every", 1):
        start = start_accuracy(model, size, a.seed)
        title += f"; SFT start: held-out greedy {start['greedy']:.3f}, sampled {start['sampled']:.3f}"
    else:
        title += f"; chat math task, {a.dtype}, device {a.device_name}"
    res = {}
    for tool in a.tools:
        out = root / f"{size}-{tool}{a.tag}"
        if out.exists():
            shutil.rmtree(out)
        cmd = (lmpo_cmd if tool == "lmpo" else trl_cmd)(size, model, out, a)
        print(f"[{size}] {tool}: {' '.join(map(str, cmd))}", flush=True)
        meas = run_measured(cmd, out, a.threads, root / f"{size}-{tool}{a.tag}.log")
        if tool == "lmpo":
            rows = read_metrics(out)
            final = json.loads((out / "summary.json").read_text())
            if not a.keep_models:                  # the saved policy + optimizer: 2 GB a run at SmolLM2's size
                for saved in ("final", "checkpoints"):
                    shutil.rmtree(out / saved, ignore_errors=True)
        else:
            d = json.loads((out / "trl.json").read_text())
            rows, final = d["steps"], d["final"]
        res[tool] = summarize(rows, final, meas, a.warmup)
        print(f"[{size}] {tool}: {json.dumps(res[tool])}", flush=True)
    (root / f"{size}-results{a.tag}.json").write_text(json.dumps({"title": title, **res}, indent=2))
    return table(size, title, res.get("lmpo", {}), res.get("trl", {}))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_measure":
        return measure(argv[1], argv[3:])
    if argv and argv[0] == "_trl":
        return run_trl(json.loads(argv[1]))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="run", choices=["run", "prepare"])
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--tools", default="lmpo,trl", help="which to run, in order (never at the same time)")
    p.add_argument("--steps", type=int, default=0, help="RL steps (default: per size)")
    p.add_argument("--eval-every", type=int, default=0, help="held-out evaluation every N steps (default: per size)")
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the median step time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="lmpo's dtype")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra lmpo config override (repeatable), e.g. --set gradient_checkpointing=true")
    p.add_argument("--keep-models", action="store_true", help="keep lmpo's saved model and checkpoints (deleted once measured)")
    p.add_argument("--tag", default="", help="suffix of the run directories and results file (for variants)")
    p.add_argument("--root", default=str(ROOT / "runs" / "bench_vs_trl"), help="run outputs")
    p.add_argument("--models", default="", help="SFT starts (default: ROOT/models)")
    p.add_argument("--base", default="", help="SmolLM2 HF directory for the real-model sizes (default: lmpo fetch-model smollm2's)")
    a = p.parse_args(argv)
    import torch

    a.device_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    a.chat_math = chat_math_file(Path(a.root))
    a.tools = a.tools.split(",")
    root = Path(a.root)
    sizes = a.sizes.split(",")
    if a.what == "prepare":
        for size in sizes:
            print(size, sft_start(size, Path(a.models or root / "models"), a.threads, a.base))
        return
    tables = [bench_size(size, a, root) for size in sizes]
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
