"""Held-out evaluation: greedy and sampled accuracy of a policy under a reward function, and pass@k."""

from __future__ import annotations

import torch

from lmpo.data import render_prompt
from lmpo.rewards.combine import CallPolicy, compute_rewards, resolve_reward_funcs, reward_inputs
from lmpo.rewards.process import is_process_reward
from lmpo.rollout import rollout
from lmpo.rollout.sampler import SamplingSpec

EVAL_BATCH_SEQS = 256          # held-out sequences (rows x samples) generated together


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k for one problem from ``n`` samples of which ``c`` are correct
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k)

    the probability that at least one of k samples drawn without replacement from the n is correct
    (averaged over problems it estimates the chance that k fresh samples contain a correct one, without
    the bias of 1 - (1 - c/n)^k). Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), with no large binomials;
    it is 1 when n - c < k (every k-subset holds a correct sample) and c/n for k = 1."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_ks(n: int) -> list[int]:
    """The k reported for n samples per problem: 1, 2, 4, ... below n, and n itself."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], reward_fn, *, max_new_tokens: int, temperature: float = 0.0,
             samples: int = 1, seed: int = 0) -> dict:
    """Mean reward of ``samples`` completions per held-out row (temperature 0 = greedy), generated
    ``EVAL_BATCH_SEQS`` sequences at a time.

    ``reward_fn`` is called as TRL calls reward functions (keywords ``prompts``, ``completions``,
    ``completion_ids`` and the rows' other columns); with a 0/1 verifier the mean reward is the exact-match
    accuracy. Returns ``{"accuracy": float, "mean_length": float}``; with ``samples`` > 1 also
    ``"pass@k"`` for each k of :func:`pass_ks`: the mean over rows of :func:`pass_at_k`, a sample counting
    as correct when its reward is at least 1 (a 0/1 verifier's pass, every test of ``code_tests``)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    total, n, length = 0.0, 0, 0.0
    correct = []                                                    # correct samples per row
    spec = SamplingSpec(group_size=samples, max_new_tokens=max_new_tokens, temperature=temperature)
    step = max(1, EVAL_BATCH_SEQS // samples)                       # at most EVAL_BATCH_SEQS sequences at once
    for s in range(0, len(rows), step):
        chunk = rows[s:s + step]
        prompts = [render_prompt(r["prompt"], tokenizer, s + i) for i, r in enumerate(chunk)]
        batch = rollout(model, tokenizer, prompts, chunk, spec, generator=gen)
        prompts_, completions, columns = reward_inputs(batch.rows, batch.completions)     # as TRL passes them
        ids = [row[: int(m.sum())].tolist() for row, m in zip(batch.completion_ids, batch.mask)]
        rewards = reward_fn(prompts=prompts_, completions=completions, completion_ids=ids, **columns)
        total += sum(float(r) for r in rewards if r is not None)
        n += len(rewards)
        length += float(batch.mask.sum())
        ok = [r is not None and float(r) >= 1.0 for r in rewards]
        correct += [sum(ok[i:i + samples]) for i in range(0, len(ok), samples)]
    model.train(was_training)
    out = {"accuracy": total / max(n, 1), "mean_length": length / max(n, 1)}
    if samples > 1 and correct:
        out.update({f"pass@{k}": sum(pass_at_k(samples, c, k) for c in correct) / len(correct)
                    for k in pass_ks(samples)})
    return out


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
    ``sources``; sampling at ``cfg.temperature``, seeded with ``cfg.seed`` (``lmpo train`` and ``lmpo eval``).
    With ``cfg.eval_samples_per_row`` = n > 1 the sampled accuracy is over n samples per row and
    ``pass@k`` (k = 1, 2, 4, ..., n) is added (:func:`pass_at_k`)."""

    def reward_fn(prompts, completions, completion_ids=None, **columns):
        return compute_rewards(sources, weights, prompts, completions, columns, completion_ids=completion_ids,
                               trainer_state=trainer_state,
                               how=CallPolicy(timeout_s=cfg.reward_timeout_s)).rewards

    kw = dict(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    greedy = evaluate(model, tokenizer, rows, reward_fn, **kw)
    sampled = evaluate(model, tokenizer, rows, reward_fn, temperature=cfg.temperature,
                       samples=cfg.eval_samples_per_row, **kw)
    return {"greedy_accuracy": greedy["accuracy"], "sampled_accuracy": sampled["accuracy"],
            **{k: v for k, v in sampled.items() if k.startswith("pass@")}}
