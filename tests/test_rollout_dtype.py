"""``rollout.dtype: bfloat16``: the built-in engine generates with a bf16 copy of the policy, refreshed
after every optimizer step; the trained weights stay float32."""

from __future__ import annotations

import pytest
import torch

from conftest import read_jsonl, rl_overrides, run_lmpo
from lmpo.models.tiny import build_model, build_tokenizer
from lmpo.rollout.engine import BuiltinEngine, SamplingSpec


def test_the_copy_is_bf16_and_follows_the_policy():
    tok = build_tokenizer()
    policy = build_model(tok, hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, max_positions=64)
    eng = BuiltinEngine(policy, tok, torch.device("cpu"), weights_dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in eng.copy.parameters())
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    stale = next(eng.copy.parameters()).clone()
    eng.update_weights(policy, 1)
    for c, p in zip(eng.copy.parameters(), policy.parameters()):
        assert torch.equal(c, p.to(torch.bfloat16))
    assert not torch.equal(stale, next(eng.copy.parameters()))
    batch = eng.generate(["12+3="], [{}], [0], SamplingSpec(group_size=2, max_new_tokens=3))
    assert batch.completion_ids.shape[0] == 2 and batch.sampler_logp.dtype == torch.float32


def test_train_with_a_bf16_generation_copy(tiny_dir, tmp_path):
    r = run_lmpo(["train", *rl_overrides(tiny_dir, tmp_path / "run", **{"rollout.dtype": "bfloat16"})], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2


def test_lora_with_a_bf16_copy_is_a_config_error(tiny_dir, tmp_path):
    pytest.importorskip("peft")
    r = run_lmpo(["train", *rl_overrides(tiny_dir, tmp_path / "run", lora_r=4, **{"rollout.dtype": "bfloat16"})], tmp_path)
    assert r.returncode == 2 and "rollout.dtype" in r.stderr and "Traceback" not in r.stderr
