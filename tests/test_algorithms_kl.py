"""KL estimators, the importance-sampling-corrected KL, KL in reward, adaptive coefficient."""

import math

import pytest
import torch

from lmpo.algorithms import adaptive_kl_coef, kl_in_reward, kl_penalty, unbiased_kl
from conftest import close

NAN, INF = float("nan"), float("inf")


pytestmark = pytest.mark.usefixtures("float64")  # hand-worked values in double precision


def test_kl_estimators_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    d = math.log(2.0)  # logp - ref_logp on the first token; 0 on the second
    close(kl_penalty(logp, ref, "k1"), [[d, 0.0]])
    close(kl_penalty(logp, ref, "k2"), [[0.5 * d * d, 0.0]])  # 0.240227
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1 = 0.193147
    close(kl_penalty(logp, ref, "k3"), [[0.5 + d - 1.0, 0.0]])
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_kl_optional_mask_blocks_garbage_gradient():
    logp = torch.tensor([[0.1, INF]], requires_grad=True)
    ref = torch.tensor([[0.0, -INF]])
    m = torch.tensor([[1, 0]])
    out = kl_penalty(logp, ref, "k3", mask=m)
    close(out, [[math.exp(-0.1) + 0.1 - 1.0, 0.0]])
    out.sum().backward()
    close(logp.grad, [[1.0 - math.exp(-0.1), 0.0]])
    close(unbiased_kl(logp.detach(), torch.tensor([[0.1, NAN]]), ref, mask=m), out.detach())


def _categorical(seed):
    g = torch.Generator().manual_seed(seed)
    theta = (torch.randn(6, generator=g)).requires_grad_()
    old_logits = torch.randn(6, generator=g)
    ref_logits = torch.randn(6, generator=g)
    return theta, torch.log_softmax(old_logits, -1), torch.log_softmax(ref_logits, -1)


def _exact_kl_grad(theta, ref_logp):
    logp = torch.log_softmax(theta, -1)
    kl = (logp.exp() * (logp - ref_logp)).sum()
    return kl.detach(), torch.autograd.grad(kl, theta)[0]


def _expected(estimator, theta, old_logp):
    """E_{x ~ pi_old}[estimator(x)] and its gradient, by enumerating the whole support."""
    logp = torch.log_softmax(theta, -1)[None, :]  # [1, V]: every token of the support
    est = estimator(logp)  # [1, V]
    value = (old_logp.exp()[None, :] * est).sum()
    return value.detach(), torch.autograd.grad(value, theta)[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_kl_gradient_is_exact_in_expectation(seed):
    theta, old_logp, ref_logp = _categorical(seed)
    kl, grad = _exact_kl_grad(theta, ref_logp)
    val, g = _expected(lambda lp: unbiased_kl(lp, old_logp[None, :], ref_logp[None, :]), theta, old_logp)
    close(val, kl)
    close(g, grad)
    # k1 weighted by the ratio is exact the same way
    _, g1 = _expected(lambda lp: unbiased_kl(lp, old_logp[None, :], ref_logp[None, :], "k1"), theta, old_logp)
    close(g1, grad)
    # the un-corrected k3 (DeepSeekMath) is biased when pi_theta != pi_old
    _, g_naive = _expected(lambda lp: kl_penalty(lp, ref_logp[None, :], "k3"), theta, old_logp)
    assert (g_naive - grad).abs().max() > 1e-2


def test_unbiased_kl_equals_k3_when_on_policy():
    theta, _, ref_logp = _categorical(3)
    old_logp = torch.log_softmax(theta.detach(), -1)
    logp = torch.log_softmax(theta, -1)[None, :]
    close(unbiased_kl(logp, old_logp[None, :], ref_logp[None, :]), kl_penalty(logp, ref_logp[None, :]))


def test_kl_in_reward_by_hand():
    scores = torch.tensor([2.0, 5.0, 7.0])
    logp = torch.tensor([[0.1, 0.2, 0.3], [0.5, NAN, INF], [1.0, 1.0, 1.0]])
    ref = torch.zeros(3, 3)
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # beta 0.1: row 0: [-0.01, -0.02, -0.03 + 2]; row 1: [-0.05 + 5, 0, 0]; row 2 empty: nothing
    expected = [[-0.01, -0.02, 1.97], [4.95, 0.0, 0.0], [0.0, 0.0, 0.0]]
    close(kl_in_reward(scores, logp, ref, m, 0.1), expected)
    close(kl_in_reward(scores, logp, ref, m.float(), torch.tensor(0.1)), expected)


def test_adaptive_kl_coef():
    # target 0.1, horizon 100, n_steps 10
    # KL 0.2: e = min(0.2/0.1 - 1, 0.2) = 0.2   -> 0.1 * (1 + 0.2 * 0.1) = 0.102
    assert adaptive_kl_coef(0.1, 0.2, 0.1, 100, 10) == pytest.approx(0.102, abs=1e-12)
    # KL 0.05: e = max(-0.5, -0.2) = -0.2       -> 0.1 * 0.98 = 0.098
    assert adaptive_kl_coef(0.1, 0.05, 0.1, 100, 10) == pytest.approx(0.098, abs=1e-12)
    # KL 0.11: e = 0.1 (inside the bound)        -> 0.1 * 1.01 = 0.101
    assert adaptive_kl_coef(0.1, 0.11, 0.1, 100, 10) == pytest.approx(0.101, abs=1e-12)
    # on target: unchanged; bounded step however far off
    assert adaptive_kl_coef(0.1, 0.1, 0.1, 100, 10) == pytest.approx(0.1, abs=1e-12)
    assert adaptive_kl_coef(0.1, 1e6, 0.1, 100, 10) == pytest.approx(0.102, abs=1e-12)
