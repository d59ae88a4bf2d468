"""One tiny-model step per preset and per DeepSeek-V3.2 correction, through the one loop."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import rl_config
from lmpo.rl.loop import train
from lmpo.rl.loop import start


def _weights(path):
    from transformers import AutoModelForCausalLM

    return {k: v.clone() for k, v in AutoModelForCausalLM.from_pretrained(str(path)).state_dict().items()}


def _changed(before, after_dir):
    after = _weights(after_dir)
    return any(not torch.equal(before[k], after[k]) for k in before)


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp", "ppo"])
def test_each_preset_takes_a_step(algorithm, sft_dir, tmp_path):
    before = _weights(sft_dir)
    cfg = rl_config(sft_dir, tmp_path / algorithm, algorithm=algorithm, max_steps=1, beta=0.05)
    if algorithm == "dapo":
        cfg.algo.overlong_buffer = 2
    if algorithm == "ppo":
        cfg.epochs, cfg.minibatches = 2, 2
    m = train(cfg)
    assert _changed(before, tmp_path / algorithm / "final")
    rows = _metrics(tmp_path / algorithm)
    bad = {k: v for k, v in rows[-1].items() if v is None or v in ("NaN", "Infinity", "-Infinity")}
    assert rows[-1]["step"] == 1 and not bad, bad       # the logger writes NaN / inf as strings, never null
    if algorithm == "ppo":
        assert "critic/loss" in rows[-1] and (tmp_path / "ppo" / "checkpoints" / "step-00000001" / "critic").exists()
    if algorithm == "dapo":
        assert "dynamic/extra_rounds" in rows[-1]
    assert "reward/mean" in m


def test_corrections_together(sft_dir, tmp_path):
    """Unbiased KL, off-policy sequence masking, kept sampling support, truncated IS, several
    minibatches (so π_θ moves away from π_old inside the step) and dual clip in one run."""
    before = _weights(sft_dir)
    cfg = rl_config(sft_dir, tmp_path / "v32", max_steps=2, beta=0.1, top_k=5, top_p=0.9, minibatches=2, epochs=2,
                    old_logp="sampler")
    cfg.algo.unbiased_kl, cfg.algo.off_policy_delta, cfg.algo.keep_sampling_mask = True, 0.0, True
    cfg.algo.tis_cap, cfg.algo.dual_clip = 2.0, 3.0
    train(cfg)
    rows = _metrics(tmp_path / "v32")
    # π_old is the sampler (old_logp=sampler), so the TIS weight exp(old - sampler) is exactly 1
    assert all(r["tis/weight_mean"] == 1.0 for r in rows)
    # π_θ moved away from π_old within each step (4 optimizer steps per rollout) ...
    assert all(r["actor/ratio_max"] > 1.0 and r["actor/ratio_min"] < 1.0 for r in rows)
    # ... so with delta = 0 some negative-advantage tokens of drifted sequences were masked
    assert any(r["off_policy/masked_frac"] > 0 for r in rows)
    # the policy left the reference (step 2 starts from updated weights), and training changed them
    assert rows[-1]["kl"] > 0
    assert _changed(before, tmp_path / "v32" / "final")


def test_keep_sampling_mask_makes_old_and_new_logp_agree(sft_dir, tmp_path):
    """With top-k sampling the sampler's log-prob is over the kept support; with keep_sampling_mask
    the trainer recomputes it over the same support, so the two agree (ratio 1 before any update)."""
    from lmpo.rl import loop as rl

    cfg = rl_config(sft_dir, tmp_path / "ksm", top_k=3, temperature=1.0)
    cfg.algo.keep_sampling_mask = True
    run = start(cfg)
    batch, _ = rl.collect(run, rl.Timer())
    assert batch.keep_mask is not None and int(batch.keep_mask[batch.mask > 0].sum(-1).max()) <= 3
    logp = rl.logp_of(run, run.actor.model, batch)
    real = batch.mask > 0
    assert torch.allclose(logp[real], batch.sampler_logp[real], atol=1e-5)
    run.algo = dataclasses.replace(run.algo, keep_sampling_mask=False)  # full-vocabulary log-probs differ from the kept-support ones
    full = rl.logp_of(run, run.actor.model, batch)
    assert (full[real] <= batch.sampler_logp[real] + 1e-6).all() and not torch.allclose(full[real], batch.sampler_logp[real])


def test_sampler_logp_is_of_the_distribution_sampled_from(sft_dir, tmp_path):
    """Under top-k without keep_sampling_mask the sampler still records the log-prob of the
    truncated, renormalised distribution it sampled from: the same numbers as with the kept
    support, above the trainer's full-vocabulary log-probs. Without truncation (top_p = 1,
    top_k = 0) it is the full distribution, which the trainer recomputes."""
    from lmpo.rl import loop as rl

    run = start(rl_config(sft_dir, tmp_path / "s", top_k=3))
    kept, position = {}, run.data.prompts.state()
    for keep in (False, True):
        run.algo = dataclasses.replace(run.algo, keep_sampling_mask=keep)
        run.data.prompts.load(position)
        kept[keep], _ = rl.collect(run, rl.Timer())               # same prompts, step and seeds: the same tokens
    plain, support = kept[False], kept[True]
    assert torch.equal(plain.completion_ids, support.completion_ids)
    real = plain.mask > 0
    assert torch.equal(plain.sampler_logp[real], support.sampler_logp[real])
    run.algo = dataclasses.replace(run.algo, keep_sampling_mask=False)
    full = rl.logp_of(run, run.actor.model, plain)
    assert (full[real] <= plain.sampler_logp[real] + 1e-6).all() and not torch.allclose(full[real], plain.sampler_logp[real])
    run.cfg.top_k = 0
    untruncated, _ = rl.collect(run, rl.Timer())
    real = untruncated.mask > 0
    torch.testing.assert_close(rl.logp_of(run, run.actor.model, untruncated)[real], untruncated.sampler_logp[real],
                               atol=1e-5, rtol=0)


def test_process_supervision_step(sft_dir, tmp_path):
    """The process advantage through the loop (collect, prepare) equals DeepSeekMath's §4.1.3
    worked out here by hand from the batch's step rewards: normalise every step reward of a group
    by the group's mean and unbiased std, then give each token the sum over the steps ending at or
    after it. Then a step of training changes the weights."""
    from lmpo.rl import loop as rl

    cfg = rl_config(sft_dir, tmp_path / "proc", reward_funcs=["addition_digit_steps"], beta=0.0)
    cfg.algo.advantage = "process"
    run = start(cfg)
    batch, _ = rl.collect(run, rl.Timer())
    rl.prepare(run, batch)
    G, (N, T) = cfg.group_size, batch.mask.shape
    want = torch.zeros(N, T, dtype=torch.float64)
    for g in range(N // G):
        rows = [i for i in range(g * G, g * G + G) if batch.valid[i]]
        steps = [(i, float(r), int(e)) for i in rows for r, e in zip(batch.step_rewards[i], batch.step_ends[i])
                 if e >= 0 and r == r]
        vals = [r for _, r, _ in steps]
        mean = sum(vals) / len(vals)
        std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        for i, r, e in steps:
            for t in range(int(batch.mask[i].sum())):
                if min(e, T - 1) >= t:
                    want[i, t] += (r - mean) / (std + 1e-4)
    assert want.abs().sum() > 0                                  # the steps carry a signal
    torch.testing.assert_close(batch.adv.double(), want, atol=1e-5, rtol=0)
    before = [p.detach().clone() for p in run.actor.model.parameters()]
    stats = rl.update(run, batch, rl.Timer())
    assert stats["train/skipped_steps"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, run.actor.model.parameters()))


def test_iterative_grpo_resets_the_reference(sft_dir, tmp_path):
    cfg = rl_config(sft_dir, tmp_path / "it", max_steps=2, beta=0.1, learning_rate=5e-3)
    cfg.iterative.ref_reset_steps = 1
    run = start(cfg)
    from lmpo.rl import loop as rl

    t = rl.Timer()
    batch, _ = rl.collect(run, t)
    rl.prepare(run, batch)
    stats = rl.update(run, batch, t)
    run.counters.step = 1
    metrics = dict(stats)
    rl.iterative_reset(run, metrics)
    assert metrics["iterative/reset"] == 1
    for p, q in zip(run.actor.model.parameters(), run.ref.parameters()):
        assert torch.equal(p, q)


def test_keep_routing_on_a_tiny_moe(tmp_path):
    """A tiny Mixtral: the rollout records the experts; the training forward replays them."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from lmpo.models.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    MixtralForCausalLM(cfg).save_pretrained(tmp_path / "moe")
    tok.save_pretrained(tmp_path / "moe")
    rc = rl_config(tmp_path / "moe", tmp_path / "out", max_steps=1, beta=0.0)
    rc.algo.keep_routing = True
    from lmpo.rl import loop as rl

    run = start(rc)
    batch, _ = rl.collect(run, rl.Timer())
    assert batch.routing is not None and len(batch.routing) == 2
    n, width = len(batch), batch.prompt_ids.shape[1] + batch.completion_ids.shape[1]
    assert batch.routing[0].shape[:2] == (n, width)
    logp = rl.logp_of(run, run.actor.model, batch)           # replayed routing: same experts as sampling
    real = batch.mask > 0
    assert torch.allclose(logp[real], batch.sampler_logp[real], atol=1e-5)
    batch.rewards = torch.arange(float(n))             # distinct rewards: a random model earns none by itself
    rl.prepare(run, batch)
    before = [p.detach().clone() for p in run.actor.model.parameters()]
    stats = rl.update(run, batch, rl.Timer())
    assert stats["train/skipped_steps"] == 0 and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, run.actor.model.parameters()))  # replayed routing trains


def test_iterative_grpo_retrains_the_reward_model(sft_dir, tmp_path):
    """Reference reset + reward model continued on verifier-labelled pairs of policy samples, with
    replay; the user's reward-model directory is never written."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    rm = AutoModelForSequenceClassification.from_pretrained(str(sft_dir), num_labels=1)
    rm.config.pad_token_id = AutoTokenizer.from_pretrained(str(sft_dir)).pad_token_id
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(str(sft_dir)).save_pretrained(rm_dir)
    before = (rm_dir / "model.safetensors").read_bytes()
    cfg = rl_config(sft_dir, tmp_path / "it", max_steps=2, beta=0.1, reward_model=str(rm_dir),
                    reward_weights=[1.0, 0.5], group_size=8)
    cfg.iterative.ref_reset_steps, cfg.iterative.rm_retrain = 1, True
    train(cfg)
    rows = _metrics(tmp_path / "it")
    assert all(r.get("iterative/reset") == 1 for r in rows)
    retrained = [r for r in rows if "rm/loss" in r]
    assert retrained, "the reward model was never retrained (no verifier-labelled pairs?)"
    assert (tmp_path / "it" / "reward_model" / "model.safetensors").exists()
    assert (rm_dir / "model.safetensors").read_bytes() == before
    if len(retrained) > 1:
        assert retrained[-1]["rm/replay_pairs"] > 0


def test_rm_retrain_needs_a_verifier(sft_dir, tmp_path):
    from lmpo.config import ConfigError

    cfg = rl_config(sft_dir, tmp_path / "x", reward_model=str(sft_dir))
    cfg.iterative.ref_reset_steps, cfg.iterative.rm_retrain = 1, True
    cfg.reward_funcs = []
    with pytest.raises(ConfigError, match="rm_retrain"):
        start(cfg)
