"""``lmpo rm``: train a reward model on preference pairs with the Bradley–Terry loss.

The model is an ``AutoModelForSequenceClassification`` with one output, started from a causal-LM
directory (a new scalar head), a reward-model directory (continued), or, by default, the
embedded tiny model after its SFT warm start (as in InstructGPT, the reward model starts from the
SFT policy: a random tiny model barely learns to check sums from pairwise labels alone). It scores the text ``prompt + response`` at its last real token. The
result is saved with ``save_pretrained``, so ``AutoModelForSequenceClassification.from_pretrained``
loads it and ``lmpo train reward_model=DIR`` uses it as a reward source.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lmpo.config import ConfigError, RMConfig, load_config, to_dict, validate
from lmpo.data.datasets import DatasetError, render_prompt
from lmpo.data.preferences import addition_preferences, load_preferences
from lmpo.data.tasks import ADDITION
from lmpo.models.load import resolve_device
from lmpo.models.value import load_scalar_model, sequence_scores
from lmpo.models.load import ModelError
from lmpo.io.rundir import check_output_dir, locked
from lmpo.stages.embedded import embedded_model
from lmpo.models.tiny import build_model, build_tokenizer
from lmpo.config import help_text


# ----------------------------------------------------------------------------- the loss


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley–Terry pairwise loss, averaged over pairs:

        L = mean_i  -log σ(r_c,i - r_r,i - m_i)

    where r_c, r_r are the scalar scores of the chosen and rejected responses ([B] each) and
    m is an optional margin ([B], 0 when None; Llama 2 uses it for graded preferences). With
    P(chosen ≻ rejected) = σ(r_c - r_r) this is the negative log-likelihood of the labels
    (Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT eq. 1)."""
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff).mean()


# ----------------------------------------------------------------------------- batching


def pair_texts(pairs: list[dict], tokenizer) -> tuple[list[str], list[str]]:
    """The chosen and rejected texts (rendered prompt + response) of ``pairs``."""
    prompts = [render_prompt(p["prompt"], tokenizer, i) for i, p in enumerate(pairs)]
    return ([pr + p["chosen"] for pr, p in zip(prompts, pairs)],
            [pr + p["rejected"] for pr, p in zip(prompts, pairs)])


def encode(tokenizer, texts: list[str], max_length: int | None, device) -> dict:
    """Pad and truncate (from the left, so the response survives) ``texts`` into tensors."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                        return_tensors="pt")
    finally:
        tokenizer.truncation_side = side
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def score_pairs(model, tokenizer, pairs: list[dict], max_length: int | None, device):
    """Scores of chosen and rejected ([B] each) with one forward over the 2B texts."""
    chosen, rejected = pair_texts(pairs, tokenizer)
    enc = encode(tokenizer, chosen + rejected, max_length, device)
    r = sequence_scores(model, enc["input_ids"], enc["attention_mask"])          # [2B]
    return r[: len(pairs)], r[len(pairs):]


def _margins(pairs, device):
    return torch.tensor([float(p.get("margin") or 0.0) for p in pairs], device=device)


@torch.no_grad()
def evaluate(model, tokenizer, pairs: list[dict], *, batch_size: int = 128, max_length: int | None = None,
             device="cpu") -> dict:
    """``eval/accuracy`` (fraction of pairs with r_c > r_r), ``eval/loss`` (Bradley–Terry) and
    ``eval/margin`` (mean r_c - r_r) over ``pairs``."""
    was_training = model.training
    model.eval()
    correct, loss, diff = 0.0, 0.0, 0.0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        rc, rr = score_pairs(model, tokenizer, chunk, max_length, device)
        correct += (rc > rr).float().sum().item()
        loss += bradley_terry_loss(rc, rr, _margins(chunk, device)).item() * len(chunk)
        diff += (rc - rr).sum().item()
    model.train(was_training)
    n = max(len(pairs), 1)
    return {"eval/accuracy": correct / n, "eval/loss": loss / n, "eval/margin": diff / n, "eval/pairs": len(pairs)}


@dataclass(frozen=True)
class FitSpec:
    """How a reward model is fitted: ``steps`` AdamW steps of ``batch_size`` pairs at learning rate
    ``lr`` (linear warm-up over ``warmup`` steps, then constant, or cosine down to 10 % with
    ``cosine``), gradient norm clipped at ``max_grad_norm``; a curve point every ``log_steps``."""

    steps: int = 50
    lr: float = 1e-5
    batch_size: int = 32
    warmup: int = 0
    cosine: bool = False
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    log_steps: int = 10
    progress: bool = False


def _fit(model, tokenizer, next_batch, spec: FitSpec, *, max_length: int | None = None, device="cpu") -> list[dict]:
    """``spec.steps`` AdamW steps of the Bradley–Terry loss on ``next_batch(step) -> pairs``. Returns
    the logged curve ``[{"step", "train/loss", "train/accuracy"}]`` (means since the last log)."""
    steps, lr, warmup, cosine = spec.steps, spec.lr, spec.warmup, spec.cosine
    weight_decay, max_grad_norm, log_steps, progress = spec.weight_decay, spec.max_grad_norm, spec.log_steps, spec.progress
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def lr_at(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cosine:
            t = (step - warmup) / max(steps - warmup, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="rm", dynamic_ncols=True)
    curve, run_loss, run_acc, run_n = [], 0.0, 0.0, 0
    for step in range(steps):
        pairs = next_batch(step)
        rc, rr = score_pairs(model, tokenizer, pairs, max_length, device)
        loss = bradley_terry_loss(rc, rr, _margins(pairs, device))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optim.step()
        sched.step()
        run_loss += loss.item()
        run_acc += (rc > rr).float().mean().item()
        run_n += 1
        if (step + 1) % log_steps == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "train/loss": run_loss / run_n, "train/accuracy": run_acc / run_n})
            if bar is not None:
                bar.set_postfix(loss=f"{run_loss / run_n:.3f}", acc=f"{run_acc / run_n:.2f}")
            run_loss, run_acc, run_n = 0.0, 0.0, 0
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return curve


def _sampler(pairs: list[dict], batch_size: int, rng: random.Random):
    """Batches that walk through shuffled epochs of ``pairs``."""
    order: list[int] = []

    def next_batch(_step):
        nonlocal order
        out = []
        while len(out) < batch_size:
            if not order:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            out.append(pairs[order.pop()])
        return out

    return next_batch


# ----------------------------------------------------------------------------- lmpo rm


TINY = "tiny"


def _load_model(cfg: RMConfig):
    """(model, tokenizer) as ``cfg.model`` says: a directory, ``tiny`` (fresh random weights), or
    None (the embedded tiny model after its SFT warm start, built once and cached)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if cfg.model == TINY:
        tokenizer = build_tokenizer() if cfg.tokenizer is None else AutoTokenizer.from_pretrained(cfg.tokenizer)
        config = build_model(tokenizer, seed=cfg.seed).config
        config.num_labels = 1
        config.architectures = None
        torch.manual_seed(cfg.seed)
        return AutoModelForSequenceClassification.from_config(config), tokenizer
    path = cfg.model or str(embedded_model(progress=cfg.progress))
    if not Path(path).exists():
        raise ConfigError(f"config key 'model' is '{path}', which does not exist: give a causal-LM or reward-model "
                          f"directory saved with save_pretrained, '{TINY}', or leave it unset for the embedded model.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return load_scalar_model(path, tokenizer), tokenizer
    except Exception as e:  # noqa: BLE001 - reported with the directory's name
        raise ModelError(f"model '{path}' could not be loaded as a reward model: {type(e).__name__}: {e}") from None


def _datasets(cfg: RMConfig) -> tuple[list[dict], list[dict]]:
    train = load_preferences(cfg.dataset)
    if cfg.eval_dataset is not None:
        held = load_preferences(cfg.eval_dataset, what="eval dataset")
    elif cfg.dataset == ADDITION:
        held = addition_preferences(cfg.eval_pairs, seed=cfg.seed + 1, heldout=True)
    else:
        rng = random.Random(cfg.seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        n_eval = int(round(cfg.eval_fraction * len(train)))
        if n_eval and n_eval >= len(train):
            raise DatasetError(f"dataset '{cfg.dataset}' has {len(train)} pairs: too few to hold out "
                               f"eval_fraction={cfg.eval_fraction} and still train.")
        held = [train[i] for i in order[:n_eval]]
        train = [train[i] for i in order[n_eval:]]
    return train, held[: cfg.eval_pairs]


def train_reward_model(cfg: RMConfig) -> dict:
    """Train a reward model as ``cfg`` says, save it to ``cfg.output_dir`` and return the metrics
    (also written to ``metrics.json``): ``eval/accuracy``, ``eval/loss``, ``eval/margin``, the
    training curve ``train/loss_curve`` and ``time_s``."""
    validate(cfg)
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    train, held = _datasets(cfg)
    model, tokenizer = _load_model(cfg)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    max_length = cfg.max_length or (tokenizer.model_max_length if tokenizer.model_max_length < 1e6 else None)

    before = evaluate(model, tokenizer, held, max_length=max_length, device=device) if held else {}
    fit = FitSpec(steps=cfg.max_steps, lr=cfg.learning_rate, batch_size=cfg.batch_size, warmup=cfg.warmup_steps,
                  cosine=True, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, log_steps=cfg.log_steps,
                  progress=cfg.progress)
    curve = _fit(model, tokenizer, _sampler(train, fit.batch_size, random.Random(cfg.seed)), fit,
                 max_length=max_length, device=device)
    after = evaluate(model, tokenizer, held, max_length=max_length, device=device) if held else {}

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metrics = {
        **after,
        "eval/accuracy_before": before.get("eval/accuracy"),
        "train/loss": curve[-1]["train/loss"] if curve else None,
        "train/pairs": len(train),
        "train/steps": cfg.max_steps,
        "time_s": round(time.time() - t0, 2),
        "train/loss_curve": curve,
        "config": to_dict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# ----------------------------------------------------------------------------- iterative GRPO


def continue_training(model_dir, new_pairs: list[dict], replay_pairs: list[dict] | None = None,
                      replay_frac: float = 0.1, *, fit: FitSpec = FitSpec(), output_dir=None, seed: int = 0,
                      device=None) -> dict:
    """Continue training the reward model in ``model_dir`` on ``new_pairs`` (built from the
    current policy's samples), replaying historical ``replay_pairs`` so it does not forget
    (DeepSeekMath, iterative RL: 10% historical data).

    Each step's batch is ``round(replay_frac * fit.batch_size)`` replay pairs (when there are any)
    and new pairs for the rest; the loss is the Bradley–Terry loss of ``bradley_terry_loss``
    for ``fit.steps`` steps at a constant learning rate ``fit.lr`` (a curve point every steps/5). The model and tokenizer are saved to ``output_dir``
    (default: back to ``model_dir``). Returns ``rm/loss``, ``rm/accuracy`` (means over the last
    logging window), ``rm/steps``, ``rm/new_pairs`` and ``rm/replay_pairs``."""
    from transformers import AutoTokenizer

    if not new_pairs:
        raise ValueError("continue_training needs at least one new preference pair.")
    if not 0 <= replay_frac < 1:
        raise ValueError(f"replay_frac must be in [0, 1), got {replay_frac}.")
    device = torch.device(device) if device is not None else resolve_device("auto")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_scalar_model(model_dir, tokenizer, require_head=True).to(device)
    replay_pairs = replay_pairs or []
    steps, batch_size = fit.steps, fit.batch_size
    n_replay = min(round(replay_frac * batch_size), batch_size - 1) if replay_pairs else 0
    rng = random.Random(seed)
    new_batch = _sampler(new_pairs, batch_size - n_replay, rng)
    old_batch = _sampler(replay_pairs, n_replay, rng) if n_replay else (lambda _s: [])
    max_length = tokenizer.model_max_length if tokenizer.model_max_length < 1e6 else None
    curve = _fit(model, tokenizer, lambda s: new_batch(s) + old_batch(s), replace(fit, log_steps=max(steps // 5, 1)),
                 max_length=max_length, device=device)
    out = Path(output_dir or model_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    last = curve[-1] if curve else {}
    return {"rm/loss": last.get("train/loss"), "rm/accuracy": last.get("train/accuracy"), "rm/steps": steps,
            "rm/new_pairs": len(new_pairs), "rm/replay_pairs": len(replay_pairs)}


# ----------------------------------------------------------------------------- command line


def main(argv: list[str]) -> int:
    """``lmpo rm [CONFIG.yaml] [key=value ...]``; ``--help`` lists the keys."""
    if any(a in ("-h", "--help") for a in argv):
        print("usage: lmpo rm [CONFIG.yaml] [key=value ...]\n\n" + (RMConfig.__doc__ or "") + "\n\n" + help_text(RMConfig))
        return 0
    path = None
    if argv and "=" not in argv[0]:
        path, argv = argv[0], argv[1:]
    try:
        cfg = load_config(path, argv, cls=RMConfig)
        with locked(check_output_dir(cfg.output_dir)):   # one run per output_dir (as lmpo train), before the model loads
            metrics = train_reward_model(cfg)
    except (ConfigError, DatasetError, ModelError) as e:
        print(f"lmpo rm: {e}", file=sys.stderr)
        return 2
    acc = metrics.get("eval/accuracy")
    print(f"reward model saved to {cfg.output_dir}: "
          + (f"held-out pairwise accuracy {acc:.3f} on {metrics['eval/pairs']} pairs "
             f"(before training {metrics['eval/accuracy_before']:.3f}), eval loss {metrics['eval/loss']:.3f}, "
             if acc is not None else "no held-out pairs, ")
          + f"{metrics['train/steps']} steps in {metrics['time_s']:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
