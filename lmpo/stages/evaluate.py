"""Held-out evaluation: greedy and sampled accuracy of a policy under a reward function."""

from __future__ import annotations

import torch

from lmpo.data import render_prompt
from lmpo.rewards.combine import CallPolicy, compute_rewards, resolve_reward_funcs, reward_inputs
from lmpo.rewards.process import is_process_reward
from lmpo.rollout import rollout
from lmpo.rollout.sampler import SamplingSpec

EVAL_BATCH_ROWS = 256          # held-out rows generated together


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], reward_fn, *, max_new_tokens: int, temperature: float = 0.0,
             samples: int = 1, seed: int = 0) -> dict:
    """Mean reward of ``samples`` completions per held-out row (temperature 0 = greedy).

    ``reward_fn`` is called as TRL calls reward functions (keywords ``prompts``, ``completions``,
    ``completion_ids`` and the rows' other columns); with a 0/1 verifier the mean reward is the exact-match
    accuracy. Returns ``{"accuracy": float, "mean_length": float}``."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    total, n, length = 0.0, 0, 0.0
    spec = SamplingSpec(group_size=samples, max_new_tokens=max_new_tokens, temperature=temperature)
    for s in range(0, len(rows), EVAL_BATCH_ROWS):
        chunk = rows[s:s + EVAL_BATCH_ROWS]
        prompts = [render_prompt(r["prompt"], tokenizer, s + i) for i, r in enumerate(chunk)]
        batch = rollout(model, tokenizer, prompts, chunk, spec, generator=gen)
        prompts_, completions, columns = reward_inputs(batch.rows, batch.completions)     # as TRL passes them
        ids = [row[: int(m.sum())].tolist() for row, m in zip(batch.completion_ids, batch.mask)]
        rewards = reward_fn(prompts=prompts_, completions=completions, completion_ids=ids, **columns)
        total += sum(float(r) for r in rewards if r is not None)
        n += len(rewards)
        length += float(batch.mask.sum())
    model.train(was_training)
    return {"accuracy": total / max(n, 1), "mean_length": length / max(n, 1)}


def eval_sources(cfg, sources: list, weights: list) -> tuple[list, list]:
    """The reward sources that score held-out evaluation: ``cfg.eval_reward_funcs`` (weight 1 each),
    else the outcome sources among ``sources`` (process rewards score steps, not answers)."""
    if cfg.eval_reward_funcs:
        chosen = resolve_reward_funcs(list(cfg.eval_reward_funcs))
        return chosen, [1.0] * len(chosen)
    pairs = [(s, w) for s, w in zip(sources, weights) if not is_process_reward(s[1])]
    return [s for s, _ in pairs], [w for _, w in pairs]


def held_out_accuracy(model, tokenizer, rows: list[dict], sources: list, weights: list, cfg,
                      trainer_state=None) -> dict:
    """``{"greedy_accuracy", "sampled_accuracy"}`` of ``model`` on ``rows`` under the weighted reward
    ``sources``; sampling at ``cfg.temperature``, seeded with ``cfg.seed`` (``lmpo train`` and ``lmpo eval``)."""

    def reward_fn(prompts, completions, completion_ids=None, **columns):
        return compute_rewards(sources, weights, prompts, completions, columns, completion_ids=completion_ids,
                               trainer_state=trainer_state,
                               how=CallPolicy(timeout_s=cfg.reward_timeout_s)).rewards

    kw = dict(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    greedy = evaluate(model, tokenizer, rows, reward_fn, **kw)
    sampled = evaluate(model, tokenizer, rows, reward_fn, temperature=cfg.temperature, **kw)
    return {"greedy_accuracy": greedy["accuracy"], "sampled_accuracy": sampled["accuracy"]}
