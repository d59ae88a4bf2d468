"""Bit-for-bit check for refactors: short seeded runs on the embedded model (GRPO with a reference,
PPO with a separate critic in both of its update paths, PPO with a shared value head, iterative GRPO
with reward-model retraining, a PPO run resumed half way), recording every metrics row except
``time/*`` and a SHA-256 of the final weights (and the critic's / value head's checkpoint).

    PYTHONPATH=. python bench/same_numbers.py record bench/results/same_numbers.json   # before
    PYTHONPATH=. python bench/same_numbers.py check  bench/results/same_numbers.json   # after: exit 1 on a difference
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

COMMON = ["dataset=addition", "reward_funcs=[addition_exact]", "max_new_tokens=6", "seed=0", "threads=1",
          "progress=false", "learning_rate=2e-4", "eval_steps=0", "save_steps=1000"]
RUNS = {
    "grpo": ["algorithm=grpo", "group_size=4", "prompts_per_step=8", "max_steps=12", "beta=0.04"],
    "ppo_separate": ["algorithm=ppo", "group_size=1", "prompts_per_step=32", "max_steps=12", "beta=0.02",
                     "epochs=1", "minibatches=1", "ppo.critic=separate", "ppo.critic_init=policy"],
    "ppo_separate_2x2": ["algorithm=ppo", "group_size=2", "prompts_per_step=16", "max_steps=8", "beta=0.02",
                         "epochs=2", "minibatches=2", "ppo.critic=separate", "ppo.critic_init=policy",
                         "ppo.critic_warmup_steps=2"],
    "ppo_shared": ["algorithm=ppo", "group_size=1", "prompts_per_step=32", "max_steps=12", "beta=0.02",
                   "epochs=2", "minibatches=2", "ppo.critic=shared"],
    "iterative_grpo": ["algorithm=grpo", "group_size=8", "prompts_per_step=4", "max_steps=4", "beta=0.1",
                       "iterative.ref_reset_steps=2", "iterative.rm_retrain=true", "reward_weights=[1.0,0.5]"],
}
RESUMED = ("ppo_separate_resumed", RUNS["ppo_separate_2x2"])   # 4 steps, stop, resume to 8


def digest(path: Path) -> str:
    """SHA-256 over the model weight files under ``path`` (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")):
        h.update(f.relative_to(path).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def state_tensors(path: Path) -> list[str]:
    """The checkpoint's state.pt (optimizers, scheduler, value head, RNG states) as the sorted
    digests of its tensors and numbers, so a state that moved to another key still compares equal."""
    import torch

    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(hashlib.sha256(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                      + str((x.dtype, tuple(x.shape))).encode()).hexdigest())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, float) and x == x:
            out.append(repr(x))
    walk(torch.load(path, weights_only=False))
    return sorted(out)


def reward_model(base: Path, out: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    tok = AutoTokenizer.from_pretrained(str(base))
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def one(name: str, args: list[str], tmp: Path, resume_at: int | None = None) -> dict:
    from lmpo.config import load_config
    from lmpo.launch import train
    from lmpo.stages.embedded import embedded_model

    out = tmp / name
    extra = []
    if name == "iterative_grpo":
        extra = [f"reward_model={reward_model(embedded_model(progress=False), tmp / 'rm')}"]
    items = [*COMMON, *args, *extra, f"output_dir={out}"]
    if resume_at:
        first = [*items, f"max_steps={resume_at}", f"save_steps={resume_at}"]
        train(load_config(None, first))
        train(load_config(None, items), resume=True)
    else:
        train(load_config(None, items))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]
    ckpts = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else []
    return {"rows": rows, "final": digest(out / "final"), "checkpoint": digest(ckpts[-1]) if ckpts else None,
            "checkpoint_state": state_tensors(ckpts[-1] / "state.pt") if ckpts else None}


def collect() -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="same_numbers"))
    try:
        res = {name: one(name, args, tmp) for name, args in RUNS.items()}
        res[RESUMED[0]] = one(RESUMED[0], RESUMED[1], tmp, resume_at=4)
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(want: dict, got: dict) -> list[str]:
    bad = []
    for name in want:
        w, g = want[name], got.get(name)
        if g is None:
            bad.append(f"{name}: missing")
            continue
        if len(w["rows"]) != len(g["rows"]):
            bad.append(f"{name}: {len(w['rows'])} rows before, {len(g['rows'])} now")
        for i, (a, b) in enumerate(zip(w["rows"], g["rows"])):
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and a.get(k) == a.get(k))
            if diff:
                bad.append(f"{name} row {i}: {', '.join(f'{k}: {a.get(k)} -> {b.get(k)}' for k in diff[:6])}")
        for k in ("final", "checkpoint", "checkpoint_state"):
            if w[k] != g[k]:
                bad.append(f"{name}: {k} weights differ")
    return bad


def main(argv) -> int:
    mode, path = argv[1], Path(argv[2])
    got = collect()
    if mode == "record":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1, default=float))
        print(f"recorded {len(got)} runs, {sum(len(r['rows']) for r in got.values())} rows -> {path}")
        return 0
    bad = compare(json.loads(path.read_text()), json.loads(json.dumps(got, default=float)))
    for line in bad:
        print("DIFF", line)
    print(f"{len(got)} runs, {sum(len(r['rows']) for r in got.values())} rows: "
          + ("identical (metrics except time/*, final and checkpoint weights, checkpoint optimizer/RNG state)" if not bad else f"{len(bad)} differences"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
