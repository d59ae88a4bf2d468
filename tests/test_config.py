"""The config tree: YAML + dotted overrides, coercion, unknown keys, bad values, help text."""

from __future__ import annotations

import dataclasses

import pytest

from lmpo.algorithms import PRESETS
from lmpo.config import Config, ConfigError, SFTConfig, _all_keys, help_text, load_config, parse_overrides


def test_yaml_then_overrides_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("group_size: 4\nlearning_rate: 1e-4\nalgorithm: dapo\nalgo:\n  eps_high: 0.28\n"
                    "reward_funcs: [addition_exact]\ntensorboard: yes\n")
    cfg = load_config(path, ["group_size=6", "algo.eps_low=0.1", "max_grad_norm=none", "reward_weights=[1, 0.5]",
                             "reward_funcs=addition_exact,rw.py:f", "temperature=1", "max_steps=3.0", "progress=off"])
    assert cfg.group_size == 6 and type(cfg.group_size) is int                     # override beats YAML
    assert cfg.learning_rate == 1e-4 and type(cfg.learning_rate) is float         # YAML's "1e-4" is a string
    assert cfg.temperature == 1.0 and type(cfg.temperature) is float
    assert cfg.max_steps == 3 and type(cfg.max_steps) is int
    assert cfg.algorithm == "dapo" and cfg.algo.eps_high == 0.28 and cfg.algo.eps_low == 0.1
    assert cfg.max_grad_norm is None and cfg.tensorboard is True and cfg.progress is False
    assert cfg.reward_funcs == ["addition_exact", "rw.py:f"] and cfg.reward_weights == [1, 0.5]
    assert Config().group_size == 8, "defaults must not be mutated"
    assert Config().reward_funcs is not Config().reward_funcs


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a=1", "algo.eps_high=0.28", "ppo.critic=separate", "s="]) == \
        {"a": 1, "algo": {"eps_high": 0.28}, "ppo": {"critic": "separate"}, "s": ""}
    with pytest.raises(ConfigError, match="'learning_rate' is not key=value"):
        parse_overrides(["learning_rate"])


@pytest.mark.parametrize("override,message", [
    ("learnin_rate=1", "unknown config key 'learnin_rate'. Did you mean 'learning_rate'?"),
    ("algo.eps_hgih=0.3", "unknown config key 'algo.eps_hgih'. Did you mean 'algo.eps_high'?"),
    ("eps_high=0.3", "unknown config key 'eps_high'. Did you mean 'algo.eps_high'?"),
    ("ppo.vf_cof=1", "Did you mean 'ppo.vf_coef'?"),
    ("algo.zzz=1", "unknown config key 'algo.zzz'."),
])
def test_unknown_keys_suggest_the_nearest(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "lmpo train --help" in str(e.value)


def test_unknown_key_in_yaml_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo:\n  dual_clp: 3\n")
    with pytest.raises(ConfigError, match=r"'algo\.dual_clp'\. Did you mean 'algo\.dual_clip'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'batch_sise'\. Did you mean 'batch_size'.*lmpo sft --help"):
        load_config(None, ["batch_sise=3"], cls=SFTConfig)


@pytest.mark.parametrize("override,message", [
    ("group_size=abc", "config key 'group_size' must be int, got 'abc'"),
    ("group_size=2.5", "config key 'group_size' must be int, got 2.5"),
    ("learning_rate=fast", "config key 'learning_rate' must be float"),
    ("tensorboard=maybe", "config key 'tensorboard' must be bool"),
    ("max_steps=true", "config key 'max_steps' must be int"),
    ("dataset=[a, b]", "config key 'dataset' must be str"),
    ("algorithm=grpx", "config key 'algorithm' has the value 'grpx'; allowed values: " + ", ".join(PRESETS)),
    ("algo.loss_agg=mean", "config key 'algo.loss_agg' has the value 'mean'; allowed values:"),
    ("reward_errors=ignore", "allowed values: skip, raise"),
    ("group_size=0", "config key 'group_size' must be > 0, got 0"),
    ("beta=-0.1", "config key 'beta' must be >= 0"),
    ("top_p=1.5", "config key 'top_p' must be in (0, 1]"),
    ("temperature=0", "config key 'temperature' must be > 0"),
    ("save_steps=0", "config key 'save_steps' must be > 0"),
    ("algo.dual_clip=0.5", "config key 'algo.dual_clip' must be > 1"),
    ("minibatches=3", "config key 'minibatches' (3) must divide prompts_per_step x group_size (64)"),
    ("algo=3", "config key 'algo' is a section"),
    ("reward_funcs=[]", "config key 'reward_funcs' is empty"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_reward_weights_length_and_type():
    load_config(None, ["reward_funcs=[a,b]", "reward_weights=[1,2]"])
    load_config(None, ["reward_funcs=[a]", "reward_model=rm", "reward_weights=[1,2]"])
    with pytest.raises(ConfigError, match=r"'reward_weights' has 3 weights for 2 reward sources"):
        load_config(None, ["reward_funcs=[a,b]", "reward_weights=[1,2,3]"])
    with pytest.raises(ConfigError, match=r"'reward_weights' has 1 weights for 2 reward sources"):
        load_config(None, ["reward_funcs=[a]", "reward_url=http://x", "reward_weights=[1]"])
    with pytest.raises(ConfigError, match=r"'reward_weights' must be a list of numbers, got 'heavy'"):
        load_config(None, ["reward_weights=[heavy]"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*missing\.yaml' does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml' is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml' must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == Config()


@pytest.mark.parametrize("cls", [Config, SFTConfig])
def test_help_lists_every_field_with_its_doc(cls):
    text = help_text(cls)
    keys = _all_keys(cls)
    assert len(keys) > 10
    for key in keys:
        assert f"  {key} = " in text, f"--help does not list {key}"
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{f.name} has no documentation"
    assert "allowed" not in text and "{grpo, ppo" in help_text(Config)


def test_a_preset_and_an_estimator_registered_in_algorithms_alone_are_accepted_and_listed(capsys):
    """The config's choice lists come from lmpo.algorithms' registries: a preset added to PRESETS and an
    estimator registered with register_advantage are valid values and appear in ``lmpo train --help``."""
    import torch

    from lmpo.algorithms import ADVANTAGES, register_advantage
    from lmpo.cli import main

    def zeros(x):
        return torch.zeros(x.mask.shape), None

    with pytest.raises(ConfigError, match="'algorithm' has the value 'my_grpo'"):
        load_config(None, ["algorithm=my_grpo"])
    with pytest.raises(ConfigError, match="'algo.advantage' has the value 'my_adv'"):
        load_config(None, ["algo.advantage=my_adv"])
    PRESETS["my_grpo"] = dict(PRESETS["grpo"], advantage="my_adv", eps_high=0.3)
    register_advantage("my_adv")(zeros)
    try:
        cfg = load_config(None, ["algorithm=my_grpo"])
        from lmpo.rl.setup import resolve_algorithm

        algo = resolve_algorithm(cfg)
        assert (algo.advantage, algo.eps_high) == ("my_adv", 0.3)
        assert load_config(None, ["algo.advantage=my_adv"]).algo.advantage == "my_adv"
        assert main(["train", "--help"]) == 0
        text = capsys.readouterr().out
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("algorithm ="))
        assert "my_grpo" in line and "grpo" in line
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("algo.advantage ="))
        assert "my_adv" in line and "group_norm" in line
    finally:
        del PRESETS["my_grpo"], ADVANTAGES["my_adv"]
    assert main(["train", "--help"]) == 0 and "my_grpo" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="'algorithm' has the value 'my_grpo'"):
        load_config(None, ["algorithm=my_grpo"])


def test_off_policy_delta_zero_is_allowed_and_negative_is_not():
    """delta = 0 masks a negative-advantage sequence as soon as its estimated KL(old || theta) is positive."""
    assert load_config(None, ["algo.off_policy_delta=0"]).algo.off_policy_delta == 0.0
    with pytest.raises(ConfigError, match="'algo.off_policy_delta' must be >= 0"):
        load_config(None, ["algo.off_policy_delta=-0.1"])
