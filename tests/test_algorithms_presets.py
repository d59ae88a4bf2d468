"""Presets: keys, values, overrides and errors."""

import pytest

from lmpo.algorithms import ADVANTAGES, AGGREGATIONS, PRESET_KEYS, PRESETS, overlong_buffer_tokens, resolve_preset

EXPECTED_KEYS = {
    "advantage", "ratio_level", "eps_low", "eps_high", "dual_clip", "loss_agg", "kl_placement",
    "kl_estimator", "unbiased_kl", "whiten_advantages", "critic", "dynamic_sampling",
    "overlong_buffer", "overlong_penalty",
}


def test_all_presets_have_exactly_the_keys_and_valid_values():
    assert set(PRESETS) == {"grpo", "ppo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp"}
    assert set(PRESET_KEYS) == EXPECTED_KEYS
    for name, p in PRESETS.items():
        assert set(p) == EXPECTED_KEYS, name
        assert p["advantage"] in ADVANTAGES and p["loss_agg"] in AGGREGATIONS
        assert resolve_preset(name) == p


def test_preset_values():
    g = PRESETS["grpo"]
    assert (g["advantage"], g["ratio_level"], g["eps_low"], g["eps_high"], g["loss_agg"],
            g["kl_placement"], g["kl_estimator"], g["critic"]) == (
        "group_norm", "token", 0.2, 0.2, "seq-mean-token-mean", "loss", "k3", None)
    p = PRESETS["ppo"]
    assert (p["advantage"], p["loss_agg"], p["kl_placement"], p["kl_estimator"],
            p["whiten_advantages"], p["critic"]) == ("gae", "token-mean", "reward", "k1", True, "separate")
    d = PRESETS["dr_grpo"]
    assert (d["advantage"], d["loss_agg"]) == ("group_mean", "seq-mean-token-sum-norm")
    a = PRESETS["dapo"]
    assert (a["eps_low"], a["eps_high"], a["loss_agg"], a["kl_placement"], a["dynamic_sampling"]) == (
        0.2, 0.28, "token-mean", "none", True)
    assert a["overlong_buffer"] == "auto"  # a fifth of max_new_tokens, as the paper's 4096 of 20480
    assert [overlong_buffer_tokens("auto", n) for n in (4, 8, 80, 20480)] == [0, 1, 16, 4096]
    assert overlong_buffer_tokens(3, 80) == 3
    s = PRESETS["gspo"]
    assert (s["ratio_level"], s["eps_low"], s["eps_high"], s["kl_placement"]) == (
        "sequence", 3e-4, 4e-4, "none")
    assert PRESETS["rloo"]["advantage"] == "leave_one_out"
    r = PRESETS["reinforce_pp"]
    assert (r["advantage"], r["kl_placement"], r["kl_estimator"], r["loss_agg"]) == (
        "reinforce_pp", "reward", "k1", "token-mean")


def test_overrides_merge_and_none_keeps():
    cfg = resolve_preset("grpo", eps_high=0.28, unbiased_kl=True, dual_clip=3.0, critic=None)
    assert cfg["eps_high"] == 0.28 and cfg["unbiased_kl"] is True and cfg["dual_clip"] == 3.0
    assert cfg["critic"] is None and cfg["eps_low"] == 0.2
    assert PRESETS["grpo"]["eps_high"] == 0.2  # the preset itself is not mutated
    assert resolve_preset("ppo", advantage=None)["advantage"] == "gae"


def test_unknown_name_and_key_and_bad_value():
    with pytest.raises(ValueError, match=r"did you mean 'grpo'") as e:
        resolve_preset("grop")
    assert "dapo" in str(e.value)  # lists the allowed names
    with pytest.raises(ValueError, match="eps_hgh"):
        resolve_preset("grpo", eps_hgh=0.3)
    with pytest.raises(ValueError, match="allowed"):
        resolve_preset("grpo", loss_agg="mean")
    with pytest.raises(ValueError, match="kl_placement"):
        resolve_preset("grpo", kl_placement="everywhere")
    with pytest.raises(ValueError, match="dual_clip"):
        resolve_preset("grpo", dual_clip=0.5)
