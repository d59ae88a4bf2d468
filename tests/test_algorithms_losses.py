"""Policy loss, clip fraction, value loss and aggregation against hand-worked values."""

import math

import pytest
import torch

from lmpo.algorithms import AGGREGATIONS, aggregate_loss, clip_fraction, policy_loss, value_loss
from conftest import ATOL, close

NAN, INF = float("nan"), float("inf")


pytestmark = pytest.mark.usefixtures("float64")  # hand-worked values in double precision


def _ratios(*rhos):
    """logp, old_logp [1, T] with ratio rho_t = exp(logp - old_logp)."""
    return torch.log(torch.tensor([rhos])), torch.zeros(1, len(rhos))


# ------------------------------------------------------------------ token level


def test_policy_loss_token_by_hand():
    logp, old = _ratios(1.5, 0.5, 1.1, 0.5, 3.0)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0]])
    m = torch.ones(1, 5)
    # rho=1.5, A=+1: -min(1.5, 1.2) = -1.2        (clipped)
    # rho=0.5, A=+1: -min(0.5, 0.8) = -0.5
    # rho=1.1, A=-1: -min(-1.1, -1.1) = 1.1
    # rho=0.5, A=-1: -min(-0.5, -0.8) = 0.8       (clipped)
    # rho=3.0, A=-1: -min(-3.0, -1.2) = 3.0
    close(policy_loss(logp, old, adv, m), [[-1.2, -0.5, 1.1, 0.8, 3.0]])
    # clip-higher eps_high = 0.28: first token -1.28
    close(policy_loss(logp, old, adv, m, eps_high=0.28), [[-1.28, -0.5, 1.1, 0.8, 3.0]])
    # dual clip c = 2: negative-advantage losses bounded by -c*A = 2 -> 3.0 becomes 2.0
    close(policy_loss(logp, old, adv, m, dual_clip=2.0), [[-1.2, -0.5, 1.1, 0.8, 2.0]])
    # clip fraction: tokens 1 and 4 of 5
    close(clip_fraction(logp, old, adv, m, 0.2, 0.2), 2 / 5)


def test_policy_loss_sequence_advantages_broadcast():
    logp, old = _ratios(1.5, 0.5)
    m = torch.ones(1, 2)
    close(policy_loss(logp, old, torch.tensor([2.0]), m), [[-2.4, -1.0]])


def test_dual_clip_bounds_and_zero_gradient():
    torch.manual_seed(0)
    logp = (torch.randn(4, 6) * 2).requires_grad_()
    old = torch.zeros(4, 6)
    adv = -torch.rand(4, 6) - 0.1  # all negative
    m = torch.ones(4, 6)
    loss = policy_loss(logp, old, adv, m, dual_clip=3.0)
    assert (loss <= -3.0 * adv + ATOL).all()
    loss.sum().backward()
    bounded = torch.exp(logp.detach()) > 3.0  # rho > c: loss = -c*A, constant
    assert bounded.any()
    assert (logp.grad[bounded] == 0).all()
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, m, dual_clip=0.5)


def test_ratio_one_gives_reinforce_gradient():
    torch.manual_seed(1)
    logp = torch.randn(3, 5).requires_grad_()
    adv = torch.randn(3, 5)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
    loss = policy_loss(logp, logp.detach(), adv, m)
    loss.sum().backward()
    close(logp.grad, -adv * m)  # d/dlogp of -rho*A at rho = 1 is -A


def test_sequence_level_is_geometric_mean():
    # log ratios 0.1 and 0.3 on real tokens; garbage on the padded one
    logp = torch.tensor([[0.1, 0.3, NAN], [math.log(2.0), math.log(0.5), INF]])
    old = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, INF]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    s0 = math.exp(0.2)  # = sqrt(e^0.1 * e^0.3) = 1.2214 > 1.2
    # no clipping (huge eps): loss_i = -s_i * A_i on every real token
    out = policy_loss(logp, old, adv, m, eps_low=0.99, eps_high=10.0, level="sequence")
    close(out, [[-s0, -s0, 0.0], [1.0, 1.0, 0.0]])  # row 1: sqrt(2 * 0.5) = 1
    # eps 0.2: row 0 clipped at 1.2
    out = policy_loss(logp, old, adv, m, level="sequence")
    close(out, [[-1.2, -1.2, 0.0], [1.0, 1.0, 0.0]])
    close(clip_fraction(logp, old, adv, m, 0.2, 0.2, level="sequence"), 0.5)
    # [N, T] advantages are reduced to their per-sequence mean over real tokens
    adv_t = torch.tensor([[0.5, 1.5, NAN], [-2.0, 0.0, 7.0]])
    close(policy_loss(logp, old, adv_t, m, level="sequence"), out)


def test_sequence_level_gradient_at_ratio_one():
    torch.manual_seed(2)
    logp = torch.randn(2, 4).requires_grad_()
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    adv = torch.tensor([0.7, -1.3])
    loss = aggregate_loss(policy_loss(logp, logp.detach(), adv, m, level="sequence"), m)
    loss.backward()
    # GSPO at s = 1: grad = -(1/N) * A_i * (1/|y_i|) * sum_t grad logp_t
    expected = -(adv / 2)[:, None] * m / m.sum(-1, keepdim=True)
    close(logp.grad, expected)


def test_policy_loss_masked_garbage_changes_nothing():
    torch.manual_seed(3)
    logp, old, adv = torch.randn(3, 4) * 0.3, torch.randn(3, 4) * 0.3, torch.randn(3, 4)
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    g = torch.tensor([NAN, INF, -INF, 1e9])[torch.arange(12) % 4].view(3, 4)
    for level in ("token", "sequence"):
        clean = policy_loss(logp, old, adv, m, level=level)
        lg = torch.where(m, logp, g).requires_grad_()
        dirty = policy_loss(lg, torch.where(m, old, -g), torch.where(m, adv, g), m, level=level)
        close(dirty, clean)
        aggregate_loss(dirty, m).backward()
        assert torch.isfinite(lg.grad).all() and (lg.grad[~m] == 0).all()
        close(clip_fraction(lg.detach(), torch.where(m, old, -g), adv, m, level=level),
              clip_fraction(logp, old, adv, m, level=level))


def test_bad_level():
    with pytest.raises(ValueError):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), level="x")


# ------------------------------------------------------------------ value loss


def test_value_loss_clipping_cases():
    old = torch.zeros(1, 5)
    ret = torch.tensor([[1.0, 1.0, 1.0, -1.0, 1.0]])
    v = torch.tensor([[0.1, 0.5, -0.5, -0.5, 0.5]]).requires_grad_()
    m = torch.tensor([[1, 1, 1, 1, 0]])
    # c = 0.2, band [-0.2, 0.2]
    # V=0.1  inside:                      max(0.81, 0.81) / 2 = 0.405
    # V=0.5  above band, toward R=1:      max(0.25, (0.2-1)^2=0.64) / 2 = 0.32 (clipped wins)
    # V=-0.5 below band, away from R=1:   max(2.25, (-0.2-1)^2=1.44) / 2 = 1.125
    # V=-0.5 below band, toward R=-1:     max(0.25, (-0.2+1)^2=0.64) / 2 = 0.32 (clipped wins)
    # last token masked -> 0
    out = value_loss(v, old, ret, m, clip=0.2)
    close(out, [[0.405, 0.32, 1.125, 0.32, 0.0]])
    out.sum().backward()
    # gradients: V-R where unclipped wins, 0 where the clipped (constant) branch wins
    close(v.grad, [[-0.9, 0.0, -1.5, 0.0, 0.0]])
    close(value_loss(v.detach(), old, ret, m, clip=None), [[0.405, 0.125, 1.125, 0.125, 0.0]])


def test_value_loss_masked_garbage():
    m = torch.tensor([[1, 0]])
    out = value_loss(torch.tensor([[0.5, NAN]]), torch.tensor([[0.0, INF]]), torch.tensor([[1.0, -INF]]), m)
    close(out, [[0.32, 0.0]])


# ------------------------------------------------------------------ aggregation


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, NAN, INF]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


def test_aggregate_by_hand():
    # seq-mean-token-mean: (mean(1,2,3) + mean(4)) / 2 = (2 + 4) / 2 = 3
    close(aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-mean"), 3.0)
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    close(aggregate_loss(PER_TOKEN, MASK, "token-mean"), 2.5)
    # seq-mean-token-sum-norm, max_len 5: (6/5 + 4/5) / 2 = 1.0
    close(aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum-norm", max_len=5), 1.0)
    assert set(AGGREGATIONS) == {"seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"}


def test_sum_norm_requires_max_len_and_bad_mode():
    with pytest.raises(ValueError, match="max_len"):
        aggregate_loss(PER_TOKEN, MASK, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="allowed"):
        aggregate_loss(PER_TOKEN, MASK, "mean")


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_padding_never_changes_loss(mode):
    torch.manual_seed(4)
    logp = torch.randn(4, 5) * 0.2
    old = torch.randn(4, 5) * 0.2
    adv = torch.randn(4)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    base = aggregate_loss(policy_loss(logp, old, adv, m), m, mode, max_len=8)
    # append 3 padded columns holding garbage, and one empty row
    pad = torch.full((4, 3), NAN)
    logp2, old2 = torch.cat([logp, pad], 1), torch.cat([old, -pad], 1)
    m2 = torch.cat([m, torch.zeros(4, 3, dtype=m.dtype)], 1)
    logp2 = torch.cat([logp2, torch.full((1, 8), INF)])
    old2 = torch.cat([old2, torch.zeros(1, 8)])
    m2 = torch.cat([m2, torch.zeros(1, 8, dtype=m.dtype)])
    adv2 = torch.cat([adv, torch.tensor([5.0])])
    padded = aggregate_loss(policy_loss(logp2, old2, adv2, m2), m2, mode, max_len=8)
    close(padded, base)


def test_all_empty_is_zero_not_nan():
    z = torch.zeros(2, 3)
    for mode in AGGREGATIONS:
        close(aggregate_loss(torch.full((2, 3), NAN), z, mode, max_len=3), 0.0)


@pytest.mark.parametrize("mode", sorted(AGGREGATIONS))
def test_global_normalizers_sum_over_ranks(mode):
    torch.manual_seed(5)
    x = torch.randn(6, 4)
    m = (torch.rand(6, 4) > 0.3).float()
    m[:, 0] = 1
    full = aggregate_loss(x, m, mode, max_len=4)
    gt, gs = m.sum(), m.any(-1).sum()
    parts = [aggregate_loss(x[i:i + 2], m[i:i + 2], mode, max_len=4, global_tokens=gt, global_seqs=gs)
             for i in (0, 2, 4)]
    close(sum(parts), full)
