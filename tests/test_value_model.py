"""The PPO critic and scalar heads: shapes, zero start, padding invariance, loading from an RM,
memory accounting."""

import pytest
import torch

from lmpo.models.tiny import build_tiny
from lmpo.models.value import (ValueHead, load_scalar_model, load_value_model, param_bytes, sequence_scores,
                               token_values, positions)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"), hidden_size=32, num_layers=2, intermediate_size=64, num_heads=2)


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _batch(tok, prompts, completions, extra_left_pad=0):
    """prompt left-padded (plus ``extra_left_pad`` more pads) + completion right-padded, as the rollout makes them."""
    p = tok(prompts, padding=True, return_tensors="pt")
    pid, pm = p["input_ids"], p["attention_mask"]
    if extra_left_pad:
        pid = torch.cat([torch.full((len(prompts), extra_left_pad), tok.pad_token_id), pid], 1)
        pm = torch.cat([torch.zeros(len(prompts), extra_left_pad, dtype=pm.dtype), pm], 1)
    comp = [tok(c, add_special_tokens=False)["input_ids"] for c in completions]
    T = max(len(c) for c in comp)
    cid = torch.tensor([c + [tok.pad_token_id] * (T - len(c)) for c in comp])
    cm = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in comp])
    ids, attn = torch.cat([pid, cid], 1), torch.cat([pm, cm], 1)
    return ids, attn, positions(attn), T


def _randomize_head(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=g))


PROMPTS = ["37+48=", "5+5=", "12+345="]
COMPLETIONS = ["85", "10<", "357"]


def test_token_values_shape_and_zero_start(tiny_dir, tok):
    model = load_value_model(tiny_dir, tok)
    assert model.config.pad_token_id == tok.pad_token_id
    ids, attn, pos, T = _batch(tok, PROMPTS, COMPLETIONS)
    v = token_values(model, ids, attn, pos, T)
    assert v.shape == (3, T) and v.dtype == torch.float32
    assert torch.equal(v, torch.zeros(3, T))
    assert torch.equal(model.score.weight, torch.zeros_like(model.score.weight))


def test_token_values_are_prefix_scores(tiny_dir, tok):
    """V[:, t] is the head on the state before completion token t: the score of prompt + completion[:t]."""
    model = load_value_model(tiny_dir, tok).eval()
    _randomize_head(model)
    ids, attn, pos, T = _batch(tok, ["37+48="], ["851"])
    with torch.no_grad():
        v = token_values(model, ids, attn, pos, T)[0]
        for t in range(T):
            enc = tok(["37+48=" + "851"[:t]], return_tensors="pt")
            s = sequence_scores(model, enc["input_ids"], enc["attention_mask"])
            assert torch.allclose(v[t], s[0], atol=1e-5)


def test_left_padding_invariance(tiny_dir, tok):
    model = load_value_model(tiny_dir, tok).eval()
    _randomize_head(model)
    with torch.no_grad():
        a = token_values(model, *_batch(tok, PROMPTS, COMPLETIONS))
        b = token_values(model, *_batch(tok, PROMPTS, COMPLETIONS, extra_left_pad=5))
        single = token_values(model, *_batch(tok, PROMPTS[:1], COMPLETIONS[:1]))
    assert a.abs().max() > 1e-3  # a real, non-zero head
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a[:1, : single.shape[1]], single, atol=1e-5, rtol=0)


def test_value_model_from_reward_model_keeps_head(tiny_dir, tok, tmp_path):
    rm = load_scalar_model(tiny_dir, tok)
    _randomize_head(rm, seed=3)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    critic = load_value_model(tmp_path / "rm", tok, from_reward_model=True)
    torch.testing.assert_close(critic.score.weight, rm.score.weight, atol=0, rtol=0)
    with torch.no_grad():
        v = token_values(critic, *_batch(tok, PROMPTS, COMPLETIONS))
    assert v.abs().min() > 0
    # a reward-model directory loaded as a plain critic starts from zero again
    fresh = load_value_model(tmp_path / "rm", tok)
    assert torch.equal(fresh.score.weight, torch.zeros_like(fresh.score.weight))
    # a causal-LM directory has no trained head to keep
    with pytest.raises(ValueError, match="no sequence-classification head"):
        load_value_model(tiny_dir, tok, from_reward_model=True)


def test_value_gradient_reaches_backbone_and_head(tiny_dir, tok):
    model = load_value_model(tiny_dir, tok)
    ids, attn, pos, T = _batch(tok, PROMPTS, COMPLETIONS)
    token_values(model, ids, attn, pos, T).sub(1.0).pow(2).mean().backward()
    assert model.score.weight.grad.abs().sum() > 0  # zero head still gets a gradient


def test_shared_value_head():
    head = ValueHead(16)
    h = torch.randn(4, 7, 16)
    v = head(h)
    assert v.shape == (4, 7) and torch.equal(v, torch.zeros(4, 7))
    with torch.no_grad():
        head.proj.weight.fill_(1.0)
        head.proj.bias.fill_(0.5)
    torch.testing.assert_close(head(h), h.sum(-1) + 0.5, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in head.parameters()) == 17


def test_param_bytes_counts():
    model = torch.nn.Linear(3, 2)  # 6 weights + 2 biases, float32
    b = param_bytes(model)
    assert b == {"params": 32, "trainable_params": 32, "grads": 0, "optimizer": 0, "total": 32}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    b = param_bytes(model, opt)
    # AdamW keeps exp_avg and exp_avg_sq (one float32 copy each) and a float32 step per parameter
    assert b["grads"] == 32 and b["optimizer"] == 2 * 32 + 2 * 4
    assert b["total"] == 32 + 32 + 72
    opt.zero_grad(set_to_none=True)                  # what the loop does after each step: still counted
    assert param_bytes(model, opt)["grads"] == 32


def test_param_bytes_counts_tied_weights_once(tiny_dir, tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    n = sum(p.numel() for p in model.parameters())
    assert param_bytes(model)["params"] == 4 * n
    half = model.to(torch.bfloat16)
    assert param_bytes(half)["params"] == 2 * n
