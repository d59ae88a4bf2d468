"""The RL loop on a tiny model: a few GRPO steps, outputs, resume, reward failures, and learning."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import DIGITS_REWARD, read_jsonl, rl_config, write_jsonl

from lmpo.data import addition_rows
from lmpo.rewards.errors import RewardError
from lmpo.rl.loop import train

REQUIRED_KEYS = ["step", "reward/mean", "reward/std", "kl", "loss", "actor/clip_frac", "entropy",
                 "completion/mean_length", "frac_zero_std_groups", "time/step_s"]


# NaN for prompts whose first operand is even (the sample failed), a number otherwise.
FLAKY = '''
import math
def flaky(prompts, completions, answer=None, **kw):
    return [math.nan if int(p.split("+")[0]) % 2 == 0 else 1.0 for p in prompts]

CALLS = [0]
def raise_every_other(prompts, completions, **kw):
    CALLS[0] += 1
    if CALLS[0] % 2 == 0:
        raise RuntimeError("reward server hiccup")
    return [1.0 if c.strip()[:1] == "1" else 0.0 for c in completions]
'''


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


def test_grpo_steps_change_weights_and_write_outputs(sft_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    cfg = rl_config(sft_dir, out, max_steps=3, beta=0.04, tensorboard=True, log_samples=2, save_steps=2)
    metrics = train(cfg)

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        missing = [k for k in REQUIRED_KEYS if k not in r]
        assert not missing, f"metrics.jsonl lacks {missing}"
        assert 0.0 <= r["reward/mean"] <= 1.0 and r["time/step_s"] > 0 and r["completion/mean_length"] > 0
        assert r["kl"] >= 0.0 and 0.0 <= r["frac_zero_std_groups"] <= 1.0
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 6 and {"step", "prompt", "completion", "reward"} <= set(samples[0])
    assert "eval/greedy_accuracy" in metrics

    final = _load(out / "final")
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    assert tok("1+2=")["input_ids"][0] == tok.bos_token_id
    before = _weights(_load(sft_dir))
    after = _weights(final)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "GRPO steps left most weights unchanged"

    from lmpo.io.checkpoint import find_checkpoint

    ckpt = find_checkpoint(out)
    assert ckpt.name == "step-00000003"                              # the last save (step 2's is removed)
    assert (ckpt / "state.pt").exists() and (ckpt / "meta.json").exists() and (ckpt / "policy" / "config.json").exists()
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert {"optimizer", "rng", "prompts"} <= set(state)
    assert state["optimizer"]["state"], "the checkpoint's optimizer has no moments"
    assert list((out / "tb").rglob("events.out.tfevents*")), "tensorboard=true wrote no event file"


def test_beta_zero_loads_no_reference(sft_dir, tmp_path):
    from lmpo.rl.loop import start

    assert start(rl_config(sft_dir, tmp_path / "a", beta=0.0)).ref is None
    run = start(rl_config(sft_dir, tmp_path / "b", beta=0.04))
    assert run.ref is not None and not any(p.requires_grad for p in run.ref.parameters())


def test_resume_gives_identical_weights(sft_dir, tmp_path):
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    common = dict(beta=0.04, save_steps=100, seed=3)
    train(rl_config(sft_dir, straight, max_steps=4, **common))
    train(rl_config(sft_dir, split, max_steps=2, **common))
    assert [r["step"] for r in read_jsonl(split / "metrics.jsonl")] == [1, 2]
    train(rl_config(sft_dir, split, max_steps=4, **common), resume=True)

    assert [r["step"] for r in read_jsonl(split / "metrics.jsonl")] == [1, 2, 3, 4]
    a, b = _weights(_load(straight / "final")), _weights(_load(split / "final"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=f"resumed weights differ at {k}")
    ra, rb = read_jsonl(straight / "metrics.jsonl"), read_jsonl(split / "metrics.jsonl")
    for x, y in zip(ra, rb):
        assert x["reward/mean"] == pytest.approx(y["reward/mean"], abs=1e-6)
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)


def test_resume_without_checkpoint_starts_from_step_0_and_says_so(sft_dir, tmp_path, capsys):
    """A scheduler relaunching a run that died before its first save, with --resume, gets a run
    from step 0 (every row once), not an error."""
    out = tmp_path / "empty"
    train(rl_config(sft_dir, out, max_steps=2), resume=True)
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "starting from step 0" in err
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]


def test_failing_samples_get_no_gradient(sft_dir, tmp_path):
    from lmpo.rl import loop as rl
    from lmpo.rl.loop import start

    (tmp_path / "flaky.py").write_text(FLAKY)
    spec = f"{tmp_path / 'flaky.py'}:flaky"
    run = start(rl_config(sft_dir, tmp_path / "out", reward_funcs=[spec], beta=0.0, prompts_per_step=8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch, stats = rl.collect(run, rl.Timer())
    even = torch.tensor([int(p.split("+")[0]) % 2 == 0 for p in batch.prompts])
    assert even.any() and (~even).any(), "the seeded prompts should mix even and odd operands"
    assert torch.equal(batch.valid, ~even)
    assert stats["reward/invalid"] == int(even.sum())
    assert any("reward failures" in str(w.message) for w in caught), "failures were not reported"
    rl.prepare(run, batch)
    assert float(batch.mask[even].abs().sum()) == 0.0, "failed samples still carry loss mask"
    assert float(batch.mask[~even].sum()) > 0
    assert torch.isfinite(batch.adv).all()


def test_reward_function_raising_sometimes_does_not_stop_the_run(sft_dir, tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY)
    out = tmp_path / "out"
    cfg = rl_config(sft_dir, out, reward_funcs=[f"{tmp_path / 'flaky.py'}:raise_every_other"], beta=0.0, max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    invalid = [r["reward/invalid"] for r in rows]
    assert invalid[1] == invalid[3] == 16 and invalid[0] == invalid[2] == 0
    assert rows[1]["reward/mean"] == "NaN" and isinstance(rows[0]["reward/mean"], float)   # NaN as a string, not null
    assert math.isfinite(rows[1]["loss"])


def test_reward_errors_raise_names_the_function(sft_dir, tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY)
    cfg = rl_config(sft_dir, tmp_path / "out", reward_funcs=[f"{tmp_path / 'flaky.py'}:flaky"], beta=0.0,
                    reward_errors="raise", prompts_per_step=8)
    with pytest.raises(RewardError, match="flaky"):
        train(cfg)


def test_grpo_raises_the_reward(sft_dir, tmp_path):
    """From the SFT-warmed tiny model, 24 GRPO steps on 8 fixed addition prompts raise both the
    exact-match reward and a digit-level partial-credit reward (seeded: deterministic)."""
    (tmp_path / "digits.py").write_text(DIGITS_REWARD)
    data = write_jsonl(tmp_path / "p8.jsonl", addition_rows(8, seed=5))
    out = tmp_path / "out"
    cfg = rl_config(sft_dir, out, dataset=data, reward_funcs=["addition_exact", f"{tmp_path / 'digits.py'}:digit_match"],
                    max_steps=24, learning_rate=1e-3, group_size=16, prompts_per_step=8, beta=0.0, seed=0,
                    save_steps=1000, log_samples=0)
    train(cfg)
    rows = read_jsonl(out / "metrics.jsonl")
    exact = [r["reward/addition_exact/mean"] for r in rows]
    digits = [r["reward/digit_match/mean"] for r in rows]
    first, last = sum(digits[:5]) / 5, sum(digits[-5:]) / 5
    assert last > first + 0.08, f"digit reward did not rise: {first:.3f} -> {last:.3f} ({digits})"
    assert sum(exact[-5:]) / 5 > sum(exact[:5]) / 5 + 0.08, f"exact-match reward did not rise: {exact}"


def test_lora_uses_the_base_as_reference_and_resumes(sft_dir, tmp_path):
    """LoRA through peft: no second model for the reference (the base with the adapter disabled),
    the final model is merged (plain transformers loads it), and --resume continues the adapter:
    2 + 2 steps give the weights of 4 straight steps."""
    from transformers import AutoModelForCausalLM

    from lmpo.rl.loop import start

    kw = dict(lora_r=4, beta=0.05, learning_rate=1e-2, save_steps=1, log_samples=0)
    cfg = rl_config(sft_dir, tmp_path / "a", max_steps=4, **kw)
    run = start(cfg)
    assert run.ref is None and run.use_ref
    train(cfg)
    cfg2 = rl_config(sft_dir, tmp_path / "b", max_steps=2, **kw)
    train(cfg2)
    cfg2.max_steps = 4
    train(cfg2, resume=True)
    a = AutoModelForCausalLM.from_pretrained(str(tmp_path / "a" / "final")).state_dict()
    b = AutoModelForCausalLM.from_pretrained(str(tmp_path / "b" / "final")).state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(sft_dir)).state_dict()
    assert set(a) == set(base)
    assert any(not torch.equal(a[k], base[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_padding_free_and_fused_adamw_take_the_default_step(sft_dir, tmp_path):
    """The opt-in fast settings (padding_free, fused_adamw) compute the same step: the same samples and
    rewards; the loss, gradient norm and entropy equal to float32 rounding; the optimizer is fused."""
    from lmpo.rl.loop import start

    (tmp_path / "digits.py").write_text(DIGITS_REWARD)                       # a dense reward: nonzero advantages
    common = dict(max_steps=1, beta=0.0, seed=5, save_steps=100, max_new_tokens=8, group_size=4, prompts_per_step=4,
                  reward_funcs=[f"{tmp_path / 'digits.py'}:digit_match"])
    train(rl_config(sft_dir, tmp_path / "plain", **common))
    train(rl_config(sft_dir, tmp_path / "fast", padding_free=True, fused_adamw=True, **common))
    (a,), (b,) = read_jsonl(tmp_path / "plain" / "metrics.jsonl"), read_jsonl(tmp_path / "fast" / "metrics.jsonl")
    assert a["reward/mean"] == b["reward/mean"] and a["completion/mean_length"] == b["completion/mean_length"]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
    # (not the weights element by element: Adam's first step is lr · sign(g) where |g| ≫ ε, so gradients
    # equal to rounding but of opposite sign near 0 move an element by 2·lr either way)
    w0, wb = _weights(_load(sft_dir)), _weights(_load(tmp_path / "fast" / "final"))
    assert a["reward/std"] > 0 and a["completion/truncated_frac"] < 1                   # advantages, and padding
    assert any(not torch.equal(wb[k], w0[k]) for k in wb)                    # the fast step moved the weights
    assert start(rl_config(sft_dir, tmp_path / "x", fused_adamw=True)).optimizer.defaults["fused"] is True


def test_gradients_are_freed_after_the_optimizer_step(sft_dir, tmp_path):
    """The update leaves no gradient behind (their memory goes to the next rollout); the optimizer stepped."""
    from lmpo.rl import loop as rl

    (tmp_path / "digits.py").write_text(DIGITS_REWARD)
    run = rl.start(rl_config(sft_dir, tmp_path / "out", beta=0.0, max_new_tokens=8, group_size=4, prompts_per_step=4,
                             reward_funcs=[f"{tmp_path / 'digits.py'}:digit_match"]))
    t = rl.Timer()
    batch, _ = rl.collect(run, t)
    rl.prepare(run, batch, t)
    stats = rl.update(run, batch, t)
    assert stats["grad_norm"] > 0 and len(run.optimizer.state) > 0
    assert all(p.grad is None for p in run.policy.parameters())
