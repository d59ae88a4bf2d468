"""Off-policy sequence mask, truncated IS weights, zero-std groups, overlong penalty,
sampling support log-probs."""

import math

import pytest
import torch

from lmpo.algorithms import (
    off_policy_sequence_mask,
    overlong_penalty,
    sampling_support_logp,
    truncated_is_weights,
    zero_std_groups,
)
from conftest import close

NAN, INF = float("nan"), float("inf")


pytestmark = pytest.mark.usefixtures("float64")  # hand-worked values in double precision


def test_off_policy_sequence_mask_per_sequence():
    # old_logp - logp per token; delta = 0.1
    gap = torch.tensor([
        [0.3, 0.3, 0.3, 0.3],     # A<0, mean 0.3 > 0.1          -> drop
        [0.39, 0.0, 0.0, 0.0],    # A<0, one far token, mean 0.0975 -> keep
        [0.3, 0.3, 0.3, 0.3],     # A>0                           -> keep
        [0.3, 0.3, NAN, -INF],    # A<0, mean over real = 0.3     -> drop (padding ignored)
        [0.0, 0.0, 0.0, 0.0],     # A<0, on-policy                -> keep
    ])
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    logp = torch.zeros(5, 4).requires_grad_()
    old = torch.where(m.bool(), gap, INF)
    adv = torch.tensor([-1.0, -1.0, 1.0, -0.5, -2.0])
    keep = off_policy_sequence_mask(logp, old, adv, m, delta=0.1)
    one, zero = [1.0] * 4, [0.0] * 4
    close(keep, [zero, one, one, zero, one])  # [N] advantages: one sign per row
    assert keep.dtype.is_floating_point and not keep.requires_grad
    # [N, T] advantages: the divergence is per sequence, the sign per token (V3.2's M_{i,t});
    # row 2 drifted (mean gap 0.3) and only its negative-advantage token is dropped, although
    # its mean advantage (0.25) is positive; row 3's positive token is kept.
    adv_t = torch.tensor([[-1.0] * 4, [-1.0] * 4, [2.0, -1.0, 0.0, 0.0], [-1.0, 0.5, 9.0, 9.0], [-1.0] * 4])
    close(off_policy_sequence_mask(logp, old, adv_t, m, 0.1),
          [zero, one, [1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], one])


def test_truncated_is_weights():
    old = torch.tensor([[math.log(1.5), math.log(3.0), 0.0, NAN]])
    sampler = torch.zeros(1, 4).requires_grad_()
    m = torch.tensor([[1, 1, 1, 0]])
    # exp(old - sampler) = [1.5, 3.0, 1.0]; cap 2 -> [1.5, 2.0, 1.0]; masked 0
    w = truncated_is_weights(old, sampler, m, cap=2.0)
    close(w, [[1.5, 2.0, 1.0, 0.0]])
    assert not w.requires_grad


def test_zero_std_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0])
    assert zero_std_groups(r, 3).tolist() == [True, False, True]
    assert zero_std_groups(torch.tensor([0, 0, 1, 0]), 2).tolist() == [True, False]


def test_overlong_penalty_piecewise():
    L = torch.tensor([10, 15, 16, 18, 20, 21])
    # max_len 20, buffer 5 -> L_exp = 15: <=15: 0; (15 - L)/5 on (15, 20]; > 20: -1
    close(overlong_penalty(L, 20, 5), [0.0, 0.0, -0.2, -0.6, -1.0, -1.0])
    close(overlong_penalty(L, 20, 5, penalty=0.5), [0.0, 0.0, -0.1, -0.3, -0.5, -0.5])
    close(overlong_penalty(L, 20, 0), [0.0, 0.0, 0.0, 0.0, 0.0, -1.0])  # hard step
    with pytest.raises(ValueError):
        overlong_penalty(L, 20, 30)


def test_sampling_support_logp():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0), 5.0]])
    keep = torch.tensor([[True, True, True, False]])
    # kept support renormalised: probs 1/6, 2/6, 3/6; dropped token -inf
    out = sampling_support_logp(logits, keep)
    close(out[:, :3], [[math.log(1 / 6), math.log(2 / 6), math.log(3 / 6)]])
    assert out[0, 3] == -INF
    # batched [N, T, V] and all-kept = plain log_softmax
    x = torch.randn(2, 3, 5)
    close(sampling_support_logp(x, torch.ones(2, 3, 5, dtype=torch.bool)), torch.log_softmax(x, -1))
