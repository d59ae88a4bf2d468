"""Advantage estimators against hand-worked values, plus properties."""

import math

import pytest
import torch

from lmpo.algorithms import (
    ADVANTAGES,
    AdvantageInputs,
    gae_advantages,
    grpo_advantages,
    process_advantages,
    register_advantage,
    reinforce_pp_advantages,
    rloo_advantages,
    whiten,
)
from conftest import close


pytestmark = pytest.mark.usefixtures("float64")  # hand-worked values in double precision


# ------------------------------------------------------------------ group estimators


def test_grpo_group_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0])
    # group 1: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1  -> (r - 2) / (1 + 1e-4)
    # group 2: all equal -> centred 0 -> 0
    e = 1.0 / (1.0 + 1e-4)
    close(grpo_advantages(r, 3), [-e, 0.0, e, 0.0, 0.0, 0.0])


def test_grpo_none_is_dr_grpo():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group means 2 and 2
    close(grpo_advantages(r, 3, scale="none"), [-1.0, 0.0, 1.0, -2.0, -2.0, 4.0])


def test_grpo_batch_divides_by_the_std_of_the_batch_rewards():
    """Lite PPO (Liu et al. 2025) / TRL scale_rewards="batch": group-centred reward over the
    unbiased std of the batch's raw rewards (not of the centred ones)."""
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # batch mean 3.5; squared deviations 6.25 + 2.25 + 0.25 + 3 * 2.25 = 15.5; unbiased var 15.5 / 5 = 3.1
    s = math.sqrt(3.1) + 1e-4
    close(grpo_advantages(r, 3, scale="batch"), [-1 / s, 0.0, 1 / s, 0.0, 0.0, 0.0])


def test_grpo_group_size_one_is_zero_not_nan():
    r = torch.tensor([1.0, 5.0, -2.0])
    for scale in ("group", "batch", "none"):
        close(grpo_advantages(r, 1, scale=scale), [0.0, 0.0, 0.0])
    close(rloo_advantages(r, 1), [0.0, 0.0, 0.0])
    close(grpo_advantages(torch.tensor([3.0]), 1, scale="batch"), [0.0])


def test_bad_group_size_and_scale():
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(4), 2, scale="bogus")


def test_rloo_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0])
    # baselines: (2+3)/2 = 2.5, (1+3)/2 = 2, (1+2)/2 = 1.5
    close(rloo_advantages(r, 3), [-1.5, 0.0, 1.5])


def test_rloo_baseline_excludes_sample():
    torch.manual_seed(0)
    r = torch.randn(8)
    base = r - rloo_advantages(r, 4)  # baseline of each sample
    r2 = r.clone()
    r2[1] += 10.0
    base2 = r2 - rloo_advantages(r2, 4)
    close(base2[1], base[1])  # own baseline unchanged
    assert not torch.allclose(base2[0], base[0])  # group mates' baselines change
    close(base2[4:], base[4:])  # other groups untouched


@pytest.mark.parametrize("name", ["group_norm", "group_mean", "batch_norm", "leave_one_out"])
def test_group_advantages_sum_to_zero(name):
    torch.manual_seed(1)
    rewards = torch.randn(12)
    mask = torch.ones(12, 3)
    adv, ret = ADVANTAGES[name](AdvantageInputs(rewards=rewards, mask=mask, group_size=4))
    assert ret is None
    close(adv[:, 0].view(3, 4).sum(-1), torch.zeros(3))


def test_int_rewards_accepted():
    close(grpo_advantages(torch.tensor([0, 1]), 2, scale="none"), [-0.5, 0.5])


# ------------------------------------------------------------------ GAE


def test_gae_three_tokens_by_hand():
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    m = torch.ones(1, 3)
    # gamma 1, lam 0.5:
    # t=2: delta = 1 + 0 - 0.7 = 0.3             A2 = 0.3
    # t=1: delta = 0 + 0.7 - 0.6 = 0.1           A1 = 0.1 + 0.5 * 0.3 = 0.25
    # t=0: delta = 0 + 0.6 - 0.5 = 0.1           A0 = 0.1 + 0.5 * 0.25 = 0.225
    adv, ret = gae_advantages(r, v, m, gamma=1.0, lam=0.5)
    close(adv, [[0.225, 0.25, 0.3]])
    close(ret, [[0.725, 0.85, 1.0]])  # A + V


def _gae_reference(r, v, m, gamma, lam):
    """Plain Python double loop over rows and their real positions (holes skipped)."""
    n, t_len = len(r), len(r[0])
    adv = [[0.0] * t_len for _ in range(n)]
    for i in range(n):
        real = [t for t in range(t_len) if m[i][t]]
        next_a, next_v = 0.0, 0.0
        for t in reversed(real):
            delta = r[i][t] + gamma * next_v - v[i][t]
            next_a = delta + gamma * lam * next_a
            next_v = v[i][t]
            adv[i][t] = next_a
    return torch.tensor(adv)


def test_gae_matches_double_loop_with_garbage_padding():
    torch.manual_seed(2)
    n, t_len = 6, 7
    r, v = torch.randn(n, t_len), torch.randn(n, t_len)
    lengths = torch.tensor([7, 5, 1, 0, 3, 6])
    m = torch.arange(t_len)[None, :] < lengths[:, None]
    ref = _gae_reference(r.tolist(), v.tolist(), m.tolist(), 0.9, 0.8)
    # garbage at masked positions: nan, inf, huge
    garbage = torch.tensor([float("nan"), float("inf"), 1e9])[torch.arange(n * t_len) % 3].view(n, t_len)
    rg, vg = torch.where(m, r, garbage), torch.where(m, v, -garbage)
    adv, ret = gae_advantages(rg, vg, m.float(), gamma=0.9, lam=0.8)
    close(adv, ref)
    close(ret, torch.where(m, ref + v, 0.0))
    assert (adv[~m] == 0).all() and (ret[~m] == 0).all()


def test_gae_mask_with_hole_links_real_tokens():
    torch.manual_seed(3)
    r, v = torch.randn(2, 6), torch.randn(2, 6)
    m = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    adv, _ = gae_advantages(r, v, m, gamma=0.95, lam=0.9)
    close(adv, _gae_reference(r.tolist(), v.tolist(), m.tolist(), 0.95, 0.9))


# ------------------------------------------------------------------ whiten, REINFORCE++


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")]])
    m = torch.tensor([[1, 1, 1, 0]])
    # mean 2, population var (1 + 0 + 1) / 3 = 2/3
    s = math.sqrt(2 / 3 + 1e-8)
    close(whiten(x, m), [[-1 / s, 0.0, 1 / s, 0.0]])
    close(whiten(x, m, shift_mean=False), [[1 / s, 2 / s, 3 / s, 0.0]])
    close(whiten(x, torch.zeros(1, 4)), [[0.0, 0.0, 0.0, 0.0]])  # nothing real: zeros, no NaN


def test_reinforce_pp_by_hand():
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 1e9]])
    m = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # reward-to-go: [[1, 1, 1], [2, 2, -]]; real values {1,1,1,2,2}: mean 1.4,
    # population var (3 * 0.16 + 2 * 0.36) / 5 = 0.24
    s = math.sqrt(0.24 + 1e-8)
    a, b = (1 - 1.4) / s, (2 - 1.4) / s
    close(reinforce_pp_advantages(r, m), [[a, a, a], [b, b, 0.0]])


# ------------------------------------------------------------------ process supervision


def test_process_advantages_by_hand():
    nan = float("nan")
    step_rewards = torch.tensor([[1.0, 0.0], [1.0, nan]])
    step_ends = torch.tensor([[1, 3], [2, -1]])
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    # group (both rows) steps {1, 0, 1}: mean 2/3, unbiased var ((1/3)^2*2 + (2/3)^2)/2 = 1/3
    s = math.sqrt(1 / 3) + 1e-4
    a, b = (1 / 3) / s, (-2 / 3) / s  # normalised reward of a "1" step and of the "0" step
    # row 0: tokens 0,1 are covered by both steps (ends 1 and 3), tokens 2,3 by the second
    # row 1: tokens 0..2 covered by its one step (end 2); token 3 masked
    close(process_advantages(step_rewards, step_ends, m, group_size=2),
          [[a + b, a + b, b, b], [a, a, a, 0.0]])


def test_process_advantages_groups_are_independent_and_single_step_is_zero():
    nan = float("nan")
    sr = torch.tensor([[2.0, nan], [nan, nan], [1.0, 3.0], [2.0, nan]])
    se = torch.tensor([[0, -1], [-1, -1], [0, 1], [1, -1]])
    m = torch.ones(4, 2)
    out = process_advantages(sr, se, m, group_size=2)
    # group 1 has a single step -> normalised 0; group 2 steps {1, 3, 2}: mean 2, std 1
    c = 1 / (1 + 1e-4)
    close(out, [[0.0, 0.0], [0.0, 0.0], [-c + c, c], [0.0, 0.0]])


# ------------------------------------------------------------------ registry


def _inputs(n=8, t_len=5, seed=4):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(n, generator=g)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2, 0, 5])[:n]
    m = (torch.arange(t_len)[None, :] < lengths[:, None]).float()
    values = torch.randn(n, t_len, generator=g)
    step_rewards = torch.randn(n, 2, generator=g)
    step_ends = torch.tensor([[0, 4]] * n)
    return dict(rewards=rewards, mask=m, group_size=4, values=values,
                step_rewards=step_rewards, step_ends=step_ends)


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_registry_uniform_signature_shape_and_masking(name):
    kw = _inputs()
    adv, ret = ADVANTAGES[name](AdvantageInputs(**kw, token_rewards=None, gamma=1.0, lam=0.95))
    m = kw["mask"].bool()
    assert adv.shape == m.shape and torch.isfinite(adv).all()
    assert (adv[~m] == 0).all()
    assert (ret is None) == (name != "gae")
    # garbage at masked positions of every [N, T] input changes nothing
    kw2 = dict(kw)
    kw2["values"] = torch.where(m, kw["values"], float("nan"))
    tr = torch.where(m, 0.0, float("inf"))
    tr_clean = torch.zeros_like(tr)
    adv_a, _ = ADVANTAGES[name](AdvantageInputs(**kw, token_rewards=tr_clean))
    adv_b, _ = ADVANTAGES[name](AdvantageInputs(**kw2, token_rewards=tr))
    close(adv_a, adv_b)


def test_registry_sequence_estimators_broadcast():
    kw = _inputs()
    adv, _ = ADVANTAGES["group_norm"](AdvantageInputs(**kw))
    expected = grpo_advantages(kw["rewards"], 4)[:, None] * kw["mask"]
    close(adv, expected)
    adv, _ = ADVANTAGES["leave_one_out"](AdvantageInputs(**kw))
    close(adv, rloo_advantages(kw["rewards"], 4)[:, None] * kw["mask"])


def test_registry_uses_token_reward_sums_when_given():
    kw = _inputs()
    m = kw["mask"].bool()
    tr = torch.where(m, torch.randn(m.shape), 0.0)
    adv, _ = ADVANTAGES["group_mean"](AdvantageInputs(**kw, token_rewards=tr))
    close(adv, grpo_advantages(tr.sum(-1), 4, scale="none")[:, None] * kw["mask"])


def test_registry_gae_puts_score_on_last_token():
    r = torch.tensor([0.0, 1.0])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    v = torch.zeros(2, 3)
    adv, ret = ADVANTAGES["gae"](AdvantageInputs(rewards=r, mask=m, group_size=1, values=v, gamma=1.0, lam=1.0))
    # V = 0, gamma = lam = 1: A_t = reward-to-go = score on every real token
    close(adv, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    close(ret, adv)


def test_registry_missing_inputs_raise_and_register():
    kw = _inputs()
    kw.pop("values")
    with pytest.raises(ValueError, match="values"):
        ADVANTAGES["gae"](AdvantageInputs(**kw))
    with pytest.raises(ValueError, match="step_rewards"):
        ADVANTAGES["process"](AdvantageInputs(rewards=kw["rewards"], mask=kw["mask"], group_size=4))

    @register_advantage("_test_zero")
    def _zero(x):
        return torch.zeros_like(x.mask, dtype=torch.float64), None

    try:
        assert ADVANTAGES["_test_zero"] is _zero
        with pytest.raises(ValueError):
            register_advantage("_test_zero")(_zero)
    finally:
        ADVANTAGES.pop("_test_zero")


# ------------------------------------------------------------------ invalid samples (reward NaN)

NAN = float("nan")


def test_grpo_statistics_over_the_valid_rows_only():
    # group [1, 0, NaN, 1]: k = 3 valid, mean 2/3, unbiased std sqrt((1/9 + 4/9 + 1/9) / 2) = sqrt(1/3);
    # counting the invalid row as its group's mean would divide by sqrt((6/9) / 3) instead: sqrt((G-1)/(k-1)) too small
    r = torch.tensor([1.0, 0.0, NAN, 1.0])
    s = math.sqrt(1 / 3) + 1e-4
    close(grpo_advantages(r, 4), [(1 / 3) / s, (-2 / 3) / s, 0.0, (1 / 3) / s])
    close(grpo_advantages(r, 4, scale="none"), [1 / 3, -2 / 3, 0.0, 1 / 3])
    close(grpo_advantages(torch.tensor([NAN, 2.0, NAN, NAN]), 4), [0.0] * 4)   # one valid row: 0, never NaN
    # batch: the std of the 5 valid rewards [1, 0, 1, 3, 5] (mean 2, squares 1 + 4 + 1 + 1 + 9 = 16, var 4)
    rb = torch.tensor([1.0, 0.0, NAN, 1.0, 3.0, 5.0, NAN, NAN])
    close(grpo_advantages(rb, 4, scale="batch"), [x / (2 + 1e-4) for x in [1 / 3, -2 / 3, 0.0, 1 / 3, -1.0, 1.0, 0.0, 0.0]])


def test_rloo_baseline_over_the_other_valid_rows():
    # group [1, NaN, 2, 6]: baselines (2+6)/2 = 4, -, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    close(rloo_advantages(torch.tensor([1.0, NAN, 2.0, 6.0]), 4), [-3.0, 0.0, -1.5, 4.5])
    close(rloo_advantages(torch.tensor([NAN, 5.0]), 2), [0.0, 0.0])             # one valid row: no baseline


@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_an_invalid_row_changes_no_other_row(name):
    """Whatever an invalid row holds (its tokens, its step rewards), every other row's advantage is
    the same as with the row removed from the batch's statistics; the invalid row gets 0."""
    if name.startswith("_test"):
        pytest.skip("registered by another test")
    torch.manual_seed(3)
    n, t_len = 8, 4
    mask = torch.ones(n, t_len)
    kw = dict(mask=mask, group_size=4, values=torch.randn(n, t_len), token_rewards=torch.randn(n, t_len),
              step_rewards=torch.randn(n, 2), step_ends=torch.tensor([[1, 3]] * n))
    rewards = torch.randn(n)
    rewards[5] = NAN
    adv, _ = ADVANTAGES[name](AdvantageInputs(rewards=rewards, **kw))
    kw2 = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in kw.items()}
    for k in ("values", "token_rewards", "step_rewards"):
        kw2[k][5] = 1e6                                # garbage in the invalid row
    adv2, _ = ADVANTAGES[name](AdvantageInputs(rewards=rewards, **kw2))
    close(adv, adv2)
    assert (adv[5] == 0).all()
