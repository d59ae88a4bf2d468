"""``lmpo sft``: supervised fine-tuning on (prompt, completion) pairs, loss on completion tokens only.

L = −(1/|C|) Σ_{t ∈ C} log π(y_t | x, y_<t), C = the completion tokens (and the EOS after them).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from lmpo.config import SFTConfig
from lmpo.data import DatasetError, load_rows, render_prompt
from lmpo.models.load import load_causal_lm, load_tokenizer, resolve_device
from lmpo.stages.evaluate import evaluate
from lmpo.rewards.text import as_text
from lmpo.models.tiny import build_model, build_tokenizer


def encode_pairs(tokenizer, prompts: list[str], completions: list[str]):
    """input_ids, attention_mask, labels [n, L] for prompt+completion+EOS; labels are −100 on the
    prompt and padding so only completion tokens carry loss. Right-padded."""
    seqs, labels = [], []
    for p, c in zip(prompts, completions):
        p_ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p_ids + c_ids)
        labels.append([-100] * len(p_ids) + c_ids)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    lab = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels])
    return ids, attn, lab


def completion_nll(model, ids, attn, labels):
    """Mean negative log-likelihood of the labelled (completion) tokens."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def validation_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Greedy exact match of the generated completion against the ``completion`` column."""
    n_new = max(len(tokenizer(str(r["completion"]), add_special_tokens=False)["input_ids"]) for r in rows) + 1

    def exact(prompts, completions, gold, **_):
        return [float(as_text(c).strip() == str(g).strip()) for c, g in zip(completions, gold)]

    rows = [{"prompt": r["prompt"], "gold": r["completion"]} for r in rows]   # reward functions never see 'completion'
    return evaluate(model, tokenizer, rows, exact, max_new_tokens=n_new)["accuracy"]


def lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def train_sft(cfg: SFTConfig) -> dict:
    """Train, save model and tokenizer to ``cfg.output_dir``, return the final metrics."""
    from tqdm.auto import tqdm

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.model is None:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer, seed=cfg.seed).to(device)
    else:
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        model = load_causal_lm(cfg.model, device)
    rows = load_rows(cfg.dataset, required=("prompt", "completion"), what="SFT dataset")
    rng = random.Random(cfg.seed)
    val = []
    if cfg.eval_steps:
        if len(rows) <= cfg.eval_rows:
            raise DatasetError(f"SFT dataset '{cfg.dataset}' has {len(rows)} rows, too few to hold out eval_rows={cfg.eval_rows}.")
        rows = rows[:]
        rng.shuffle(rows)
        val, rows = rows[: cfg.eval_rows], rows[cfg.eval_rows:]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.max_steps))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    t0 = time.time()
    losses, history = [], []
    bar = tqdm(range(cfg.max_steps), desc="sft", disable=not cfg.progress, dynamic_ncols=True)
    for step in bar:
        picked = [rng.randrange(len(rows)) for _ in range(cfg.batch_size)]
        batch = [rows[i] for i in picked]
        prompts = [render_prompt(rows[i]["prompt"], tokenizer, i) for i in picked]
        ids, attn, lab = (x.to(device) for x in encode_pairs(tokenizer, prompts, [str(r["completion"]) for r in batch]))
        loss = completion_nll(model, ids, attn, lab)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if val and (step + 1) % cfg.eval_steps == 0:
            acc = validation_accuracy(model, tokenizer, val)
            history.append({"step": step + 1, "loss": losses[-1], "val_accuracy": acc})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{acc:.2f}")
            if cfg.stop_at_accuracy is not None and acc >= cfg.stop_at_accuracy:
                break
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = {"loss": sum(losses[-20:]) / max(1, len(losses[-20:])), "steps": len(losses),
               "seconds": round(time.time() - t0, 2), "history": history}
    (out / "sft_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
