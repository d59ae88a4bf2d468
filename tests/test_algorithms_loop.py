"""Loop-level oracles: a stand-in policy (a trainable tensor of log-probs) driven through the real
``prepare`` and ``loss_fn`` of ``lmpo.rl.loop``, against the formulas written out by hand here
in plain Python (loops over rows and tokens, no lmpo function)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import rl_config
from lmpo.rollout import RolloutBatch
from lmpo.rl import loop as rl
from lmpo.parallel.torchrun import World
from lmpo.rl.critic import NoCritic
from lmpo.rl.setup import Counters, resolve_algorithm

NAN = float("nan")
TOL = 1e-6


class StandIn:
    """A policy that is a [N, T] tensor of log-probs: row i of any (sub-)batch is the batch row
    whose first completion token id is i."""

    def __init__(self, logp: torch.Tensor):
        self.logp = logp


@pytest.fixture(autouse=True)
def stand_in_forward(monkeypatch):
    def completion_logp(model, batch, temperature, keep_sampling_mask=False, with_entropy=False,
                        value_head=None, **extra):
        lp = model.logp[batch.completion_ids[:, 0]]
        lp = torch.where(batch.mask > 0, lp, torch.zeros_like(lp))
        return lp, (torch.zeros_like(lp) if with_entropy else None), None

    monkeypatch.setattr(rl, "completion_logp", completion_logp)


def make_run(policy, ref=None, **settings):
    algo_keys = {k[5:]: settings.pop(k) for k in list(settings) if k.startswith("algo.")}
    cfg = rl_config("unused-model", "unused-out", **settings)
    for k, v in algo_keys.items():
        setattr(cfg.algo, k, v)
    return SimpleNamespace(cfg=cfg, algo=resolve_algorithm(cfg), counters=Counters(beta=cfg.beta),
                           actor=SimpleNamespace(model=policy), ref=ref, use_ref=ref is not None, world=World(),
                           critic=NoCritic(), device=torch.device("cpu"))


def make_batch(rewards, lengths, T, sampler_logp=None):
    n = len(rewards)
    ids = torch.zeros(n, T, dtype=torch.long)
    ids[:, 0] = torch.arange(n)
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).float()
    r = torch.tensor(rewards, dtype=torch.float32)
    return RolloutBatch(prompt_ids=torch.zeros(n, 1, dtype=torch.long), prompt_mask=torch.ones(n, 1, dtype=torch.long),
                        completion_ids=ids, mask=mask,
                        sampler_logp=sampler_logp if sampler_logp is not None else torch.zeros(n, T),
                        truncated=torch.zeros(n, dtype=torch.bool), group_size=0, rewards=r, valid=~torch.isnan(r))


def totals(batch):
    return {"global_tokens": batch.mask.sum().clamp(min=1), "global_seqs": (batch.mask.sum(-1) > 0).sum().clamp(min=1)}


def mean_std(xs):
    """Mean and unbiased std of a list of floats (0 std for fewer than 2)."""
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def k3(lp, ref):
    return math.exp(ref - lp) - (ref - lp) - 1


def assert_close(got, want):
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64),
                               atol=TOL, rtol=0)


REWARDS = [1.0, 0.0, NAN, 1.0, 0.5, 0.5, 2.0, 0.0]   # two groups of 4; row 2's reward failed
LENGTHS = [3, 2, 3, 1, 2, 3, 3, 2]
T = 3


def _theta(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, T, generator=g) * 0.3 - 1.0)


def test_grpo_with_an_invalid_sample_and_kl_in_the_loss():
    """GRPO's group statistics over the k valid rows only; the invalid row has advantage 0, no
    gradient, and is not counted in N'; the loss and its gradient are DeepSeekMath's objective."""
    theta = _theta(0).requires_grad_()
    ref = _theta(1)
    beta = 0.1
    run = make_run(StandIn(theta), StandIn(ref), algorithm="grpo", beta=beta, group_size=4, prompts_per_step=2)
    batch = make_batch(REWARDS, LENGTHS, T)
    rl.prepare(run, batch)
    # by hand: per group, mean and unbiased std over valid rows, A = (r - mean) / (std + 1e-4)
    adv = []
    for g in range(2):
        rs = REWARDS[4 * g:4 * g + 4]
        m, s = mean_std([r for r in rs if r == r])
        adv += [0.0 if r != r else (r - m) / (s + 1e-4) for r in rs]
    assert_close(batch.adv[:, 0], adv)
    assert (batch.adv[2] == 0).all() and (batch.mask[2] == 0).all()
    # loss = (1/N') sum_i (1/|o_i|) sum_t (-A_i * rho + beta * k3), rho = 1 (pi_old = current), N' = 7
    loss, _ = rl.loss_fn(run, batch, totals(batch))
    loss.backward()
    th, rf = theta.detach().double().tolist(), ref.double().tolist()
    valid_rows = [i for i in range(8) if REWARDS[i] == REWARDS[i]]
    n_seq = len(valid_rows)
    want_loss = 0.0
    want_grad = [[0.0] * T for _ in range(8)]
    for i in valid_rows:
        L = LENGTHS[i]
        for t in range(L):
            want_loss += (-adv[i] + beta * k3(th[i][t], rf[i][t])) / (L * n_seq)
            want_grad[i][t] = (-adv[i] + beta * (1 - math.exp(rf[i][t] - th[i][t]))) / (L * n_seq)
    assert_close(loss.item(), want_loss)
    assert_close(theta.grad, want_grad)


@pytest.mark.parametrize("estimator", ["k1", "k2"])
def test_rloo_with_kl_in_the_reward_and_an_invalid_sample(estimator):
    """RLOO with the KL folded into the reward: R_i = r_i - beta * sum_t k(old, ref); the baseline
    is the mean of the OTHER valid rows of the group; the invalid row is in no baseline.
    algo.kl_estimator picks k (k1 = d, k2 = d^2 / 2): the key reaches the reward."""
    theta = _theta(2).requires_grad_()
    ref = _theta(3)
    beta = 0.05
    run = make_run(StandIn(theta), StandIn(ref), algorithm="rloo", beta=beta, group_size=4, prompts_per_step=2,
                   **{"algo.kl_estimator": estimator})
    # on-policy, the built-in sampler recorded the current policy's log-probs: pi_old = theta
    batch = make_batch(REWARDS, LENGTHS, T, sampler_logp=theta.detach().clone())
    rl.prepare(run, batch)
    th, rf = theta.detach().double().tolist(), ref.double().tolist()
    k = (lambda d: d) if estimator == "k1" else (lambda d: 0.5 * d * d)
    R = [r - beta * sum(k(th[i][t] - rf[i][t]) for t in range(LENGTHS[i])) if r == r else NAN
         for i, r in enumerate(REWARDS)]
    adv = []
    for g in range(2):
        rows = range(4 * g, 4 * g + 4)
        for i in rows:
            others = [R[j] for j in rows if j != i and R[j] == R[j]]
            adv.append(0.0 if R[i] != R[i] else R[i] - sum(others) / len(others))
    assert_close(batch.adv[:, 0], adv)
    assert run.algo.kl_estimator == estimator


def test_off_policy_mask_drops_the_policy_term_and_keeps_the_kl():
    """DeepSeek-V3.2: a negative-advantage sequence whose mean log(pi_old / pi_theta) exceeds
    delta loses its clipped policy term; its -beta * KL term stays (value and gradient)."""
    theta = _theta(4).requires_grad_()
    ref = _theta(5)
    beta, gap = 0.1, 0.5
    sampler = theta.detach().clone()
    sampler[0] += gap                                  # row 0 (A < 0 below) drifted: mean gap 0.5 > delta
    run = make_run(StandIn(theta), StandIn(ref), algorithm="grpo", beta=beta, group_size=4, prompts_per_step=2,
                   old_logp="sampler", **{"algo.off_policy_delta": 0.1})
    rewards = [0.0, 1.0, 1.0, 1.0, 0.5, 0.5, 2.0, 0.0]
    batch = make_batch(rewards, LENGTHS, T, sampler_logp=sampler)
    rl.prepare(run, batch)
    adv = batch.adv[:, 0].double().tolist()
    assert adv[0] < 0
    loss, stats = rl.loss_fn(run, batch, totals(batch))
    loss.backward()
    th, rf, old = theta.detach().double().tolist(), ref.double().tolist(), sampler.double().tolist()
    want_loss, want_grad = 0.0, [[0.0] * T for _ in range(8)]
    for i in range(8):
        L = LENGTHS[i]
        drifted = sum(old[i][t] - th[i][t] for t in range(L)) / L > 0.1
        for t in range(L):
            rho = math.exp(th[i][t] - old[i][t])
            unclipped, clipped = -rho * adv[i], -min(max(rho, 0.8), 1.2) * adv[i]
            pol = max(unclipped, clipped)
            d_pol = 0.0 if clipped > unclipped else -rho * adv[i]       # d/d theta of the active branch
            keep = 0.0 if (adv[i] < 0 and drifted) else 1.0
            want_loss += (keep * pol + beta * k3(th[i][t], rf[i][t])) / (L * 8)
            want_grad[i][t] = (keep * d_pol + beta * (1 - math.exp(rf[i][t] - th[i][t]))) / (L * 8)
    assert_close(loss.item(), want_loss)
    assert_close(theta.grad, want_grad)
    assert (theta.grad[0, :LENGTHS[0]] != 0).all()     # the masked row still feels the KL
    assert stats["off_policy/masked_frac"] == pytest.approx(LENGTHS[0] / sum(LENGTHS))


@pytest.mark.parametrize("cap, factor", [(2.0, 1.5), (1.2, 1.2)])
def test_tis_scales_the_policy_loss_by_the_truncated_weight(cap, factor):
    """Truncated IS (Yao et al. 2025): with the sampler 1.5x less likely than pi_old on every token,
    w = min(1.5, cap) multiplies the policy loss and its gradient (beta = 0)."""
    theta = _theta(6).requires_grad_()
    rewards = [1.0, 0.0, 0.5, 1.0, 0.5, 0.5, 2.0, 0.0]
    sampler = theta.detach() - math.log(1.5)

    def loss_and_grad(tis_cap):
        theta.grad = None
        run = make_run(StandIn(theta), algorithm="grpo", beta=0.0, group_size=4, prompts_per_step=2,
                       **{"algo.tis_cap": tis_cap, "algo.loss_agg": "token-mean"})  # seq-mean: sum_i A_i = 0
        batch = make_batch(rewards, LENGTHS, T, sampler_logp=sampler)
        rl.prepare(run, batch)
        loss, _ = rl.loss_fn(run, batch, totals(batch))
        loss.backward()
        return loss.item(), theta.grad.clone()

    plain, g_plain = loss_and_grad(None)
    weighted, g_weighted = loss_and_grad(cap)
    assert abs(plain) > 1e-3
    assert_close(weighted, factor * plain)
    assert_close(g_weighted, factor * g_plain)


def test_adv_eps_reaches_the_advantage():
    """algo.adv_eps is the eps of (r - mean) / (std + eps): eps = 1 gives +-0.5 / (sqrt(1/2) + 1)."""
    theta = _theta(7, n=4)
    for eps in (1e-4, 1.0):
        run = make_run(StandIn(theta), algorithm="grpo", beta=0.0, group_size=2, prompts_per_step=2,
                       **{"algo.adv_eps": eps})
        batch = make_batch([0.0, 1.0, 3.0, 3.0], [3, 3, 2, 1], T)
        rl.prepare(run, batch)
        a = 0.5 / (math.sqrt(0.5) + eps)
        assert_close(batch.adv[:, 0], [-a, a, 0.0, 0.0])


def test_gamma_discounts_the_reinforce_pp_return():
    """REINFORCE++ with algo.gamma: G_t = gamma^(L-1-t) r on a row of length L (the reward on the
    last token), whitened over all real tokens with the population variance."""
    theta = _theta(8, n=4)
    rewards, lengths = [1.0, -1.0, 2.0, NAN], [3, 2, 1, 3]
    for gamma in (1.0, 0.5):
        run = make_run(StandIn(theta), algorithm="reinforce_pp", beta=0.0, group_size=2, prompts_per_step=2,
                       **{"algo.gamma": gamma})
        batch = make_batch(rewards, lengths, T)
        rl.prepare(run, batch)
        G = {(i, t): gamma ** (lengths[i] - 1 - t) * rewards[i] for i in range(3) for t in range(lengths[i])}
        mu = sum(G.values()) / len(G)
        var = sum((g - mu) ** 2 for g in G.values()) / len(G)
        want = [[(G[(i, t)] - mu) / math.sqrt(var + 1e-8) if (i, t) in G else 0.0 for t in range(T)] for i in range(4)]
        assert_close(batch.adv, want)
