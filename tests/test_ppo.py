"""PPO in the one loop: a critic (separate or shared), KL in the reward, GAE, several epochs, and
the reward going up on the tiny model."""

from __future__ import annotations

import pytest
from conftest import DIGITS_REWARD, read_jsonl, rl_config, write_jsonl

from lmpo.data import addition_rows
from lmpo.rl.loop import train



@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_raises_the_reward(sft_dir, tmp_path, critic):
    """From the SFT-warmed tiny model, PPO (critic, GAE, 2 epochs × 2 minibatches, k1 KL in the
    reward) on 8 fixed addition prompts raises the digit-level reward."""
    (tmp_path / "digits.py").write_text(DIGITS_REWARD)
    data = write_jsonl(tmp_path / "p8.jsonl", addition_rows(8, seed=5))
    out = tmp_path / critic
    cfg = rl_config(sft_dir, out, dataset=data, algorithm="ppo", reward_funcs=[f"{tmp_path / 'digits.py'}:digit_match"],
                    max_steps=20, learning_rate=1e-3, group_size=8, prompts_per_step=8, beta=0.01, seed=0,
                    epochs=2, minibatches=2, save_steps=1000, log_samples=0)
    cfg.ppo.critic = critic
    train(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    reward = [r["reward/mean"] for r in rows]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    assert last > first + 0.05, f"PPO ({critic} critic) did not raise the reward: {first:.3f} -> {last:.3f}"
    assert all("critic/loss" in r and "kl_reward" in r for r in rows)
    assert rows[-1]["critic/loss"] < rows[0]["critic/loss"], "the critic did not fit the returns"


def test_adaptive_kl_moves_beta(sft_dir, tmp_path):
    """Ziegler et al.'s controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon), n = 16 samples.
    Step 1 sees KL = 0 (policy = reference), below target: β falls by 0.2·16/100; step 2 sees a
    positive KL far above the 1e-6 target: β rises by the same factor."""
    cfg = rl_config(sft_dir, tmp_path / "akl", algorithm="ppo", max_steps=3, beta=0.05, learning_rate=3e-3)
    cfg.ppo.kl_target, cfg.ppo.kl_horizon = 1e-6, 100
    train(cfg)
    rows = read_jsonl(tmp_path / "akl" / "metrics.jsonl")
    betas = [r["beta"] for r in rows]          # the β each step trained with
    assert abs(rows[0]["kl_reward"]) < 1e-6    # policy = reference, up to float rounding of the two forwards
    assert betas[0] == pytest.approx(0.05)
    assert betas[1] == pytest.approx(0.05 * (1 - 0.2 * 16 / 100))
    assert rows[1]["kl_reward"] > 1e-6
    assert betas[2] == pytest.approx(betas[1] * (1 + 0.2 * 16 / 100))


def test_ppo_ptx_mixes_a_language_modelling_loss(sft_dir, tmp_path):
    cfg = rl_config(sft_dir, tmp_path / "ptx", algorithm="ppo", max_steps=1, beta=0.02)
    cfg.ppo.ptx_coef = 0.1
    train(cfg)
    assert read_jsonl(tmp_path / "ptx" / "metrics.jsonl")[-1]["ptx/loss"] > 0


def test_ppo_ptx_dataset_is_checked_before_training(sft_dir, tmp_path):
    from lmpo.data import DatasetError

    bad = write_jsonl(tmp_path / "noc.jsonl", [{"prompt": "1+2="}])
    cfg = rl_config(sft_dir, tmp_path / "bad", algorithm="ppo", max_steps=1)
    cfg.ppo.ptx_coef, cfg.ppo.ptx_dataset = 0.1, str(bad)
    with pytest.raises(DatasetError, match="completion"):
        train(cfg)
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
