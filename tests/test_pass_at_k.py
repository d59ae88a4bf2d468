"""pass@k: the unbiased estimator (Chen et al. 2021) by hand, and evaluate()'s per-row counting."""

from __future__ import annotations

import math

import pytest

from lmpo.stages.evaluate import evaluate, pass_at_k, pass_ks


def test_pass_at_k_hand_worked():
    # n = 5 samples, c = 2 correct, k = 2: 1 - C(3, 2) / C(5, 2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-12)
    # n = 10, c = 3, k = 4: 1 - C(7, 4) / C(10, 4) = 1 - 35/210 = 5/6
    assert pass_at_k(10, 3, 4) == pytest.approx(5 / 6, abs=1e-12)
    # k = 1 is the fraction correct; no correct sample gives 0; n - c < k gives 1
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8, abs=1e-12)
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 5, 4) == 1.0
    assert pass_at_k(8, 1, 8) == 1.0


def test_pass_at_k_matches_binomials_and_differs_from_the_biased_estimate():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # 1 - (1 - c/n)^k (sampling with replacement) is biased low: 1 - (3/5)^2 = 0.64 < 0.7
    assert pass_at_k(5, 2, 2) > 1 - (1 - 2 / 5) ** 2


def test_pass_at_k_rejects_bad_counts():
    for n, c, k in ((4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError, match="pass_at_k"):
            pass_at_k(n, c, k)


def test_pass_ks():
    assert pass_ks(1) == [1]
    assert pass_ks(4) == [1, 2, 4]
    assert pass_ks(6) == [1, 2, 4, 6]


def test_evaluate_counts_correct_samples_per_row(tiny_dir):
    """Two rows × 4 samples; a scripted reward makes 2 of row 0's samples correct (one of them with a
    reward above 1) and none of row 1's (0.9 is not a pass)."""
    from lmpo.models.load import load_causal_lm, load_tokenizer

    model, tok = load_causal_lm(str(tiny_dir)), load_tokenizer(str(tiny_dir))
    seen = []

    def scripted(prompts, completions, completion_ids=None, **columns):
        seen.append(list(columns["name"]))
        return [1.0, 0.0, 1.5, 0.0, 0.9, 0.0, 0.0, 0.0]

    rows = [{"prompt": "1+2=", "name": "a"}, {"prompt": "3+4=", "name": "b"}]
    out = evaluate(model, tok, rows, scripted, max_new_tokens=3, temperature=1.0, samples=4)
    assert seen == [["a"] * 4 + ["b"] * 4]                        # a row's samples are consecutive
    assert out["pass@1"] == pytest.approx((2 / 4 + 0) / 2)
    assert out["pass@2"] == pytest.approx((1 - math.comb(2, 2) / math.comb(4, 2)) / 2)
    assert out["pass@4"] == pytest.approx(0.5)
    assert out["accuracy"] == pytest.approx(3.4 / 8)
    assert "pass@1" not in evaluate(model, tok, rows[:1], lambda **kw: [1.0], max_new_tokens=3)


def test_held_out_accuracy_reports_pass_at_k_only_with_several_samples(tiny_dir):
    """``eval_samples_per_row`` (the key ``lmpo eval`` and ``lmpo train`` read) switches pass@k on."""
    from lmpo.config import load_config
    from lmpo.models.load import load_causal_lm, load_tokenizer
    from lmpo.rewards.combine import resolve_reward_funcs
    from lmpo.stages.evaluate import held_out_accuracy

    def first_of_group(prompts, completions, **kw):      # one correct sample in every 4
        return [1.0 if i % 4 == 0 else 0.0 for i in range(len(completions))]

    model, tok = load_causal_lm(str(tiny_dir)), load_tokenizer(str(tiny_dir))
    rows = [{"prompt": "1+2="}, {"prompt": "3+4="}]
    sources = resolve_reward_funcs([first_of_group])
    one = held_out_accuracy(model, tok, rows, sources, [1.0], load_config(None, ["max_new_tokens=3"]))
    assert not any(k.startswith("pass@") for k in one)
    four = held_out_accuracy(model, tok, rows, sources, [1.0],
                             load_config(None, ["max_new_tokens=3", "eval_samples_per_row=4"]))
    assert four["pass@1"] == pytest.approx(0.25) == four["sampled_accuracy"]
    assert four["pass@2"] == pytest.approx(0.5) and four["pass@4"] == 1.0
