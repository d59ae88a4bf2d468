"""The lean decoding step (``lmpo/rollout/lean_decode.py``, used for ``dtype: bfloat16`` generation) computes
what HF's forward computes: in float32 the same logits as a full forward over prompt + tokens so far (left
padding, grouped-query attention, biases, rows leaving the batch), under bf16 the same up to bf16 rounding."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lmpo.rollout import lean_decode
from lmpo.rollout.sampler import SamplingSpec, _prefill, generate

ARCH = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def model_of(kind: str):
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**ARCH)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**ARCH))
    with torch.no_grad():                 # non-zero norm weights and biases (Qwen2 has q, k, v biases)
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def prompts():
    ids = torch.tensor([[0, 0, 5, 9, 11], [3, 4, 6, 8, 2]])                       # left-padded
    return ids, (ids != 0).long()


def full_forward_logits(model, ids, pm, tokens, rows, G):
    """Next-token logits of rows ``rows`` after prompt + ``tokens`` [N, s], by one forward without a cache."""
    seq = torch.cat([ids.repeat_interleave(G, 0)[rows], tokens[rows]], 1)
    attn = torch.cat([pm.repeat_interleave(G, 0)[rows], torch.ones_like(tokens[rows])], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=seq, attention_mask=attn, position_ids=pos).logits[:, -1].float()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_lean_steps_equal_a_full_forward_in_float32(kind):
    model, G, steps = model_of(kind), 2, 5
    assert lean_decode.supports(model)
    ids, pm = prompts()
    with torch.no_grad():
        cache, _, attn, pos = _prefill(model, ids, pm, G, None)
        lean = lean_decode.LeanDecoder(model, cache, attn, steps, dtype=torch.float32)
        tokens = torch.randint(1, 97, (2 * G, steps), generator=torch.Generator().manual_seed(1))
        rows = torch.arange(2 * G)
        for s in range(steps):
            if s == 2:                                                   # rows 1 and 2 finish: they leave the batch
                keep = torch.tensor([0, 3])
                lean.select(keep)
                rows, pos = rows[keep], pos[keep]
            got = lean.step(tokens[rows, s], pos)
            pos = pos + 1
            want = full_forward_logits(model, ids, pm, tokens[:, :s + 1], rows, G)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_lean_step_under_bf16_is_hf_autocast_up_to_bf16_rounding():
    model, G = model_of("llama"), 2
    ids, pm = prompts()
    tokens = torch.randint(1, 97, (2 * G, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache, _, attn, pos = _prefill(model, ids, pm, G, None)
        lean = lean_decode.LeanDecoder(model, cache, attn, 3)
        for s in range(3):
            got = lean.step(tokens[:, s], pos + s)
        want = full_forward_logits(model, ids, pm, tokens, torch.arange(2 * G), G)
    assert got.dtype == torch.float32
    exact = full_forward_logits(model, ids, pm, tokens, torch.arange(2 * G), G)     # float32, no autocast
    err_lean, err_hf = (got - exact).abs().max(), (want - exact).abs().max()
    assert err_lean < 0.05 * exact.abs().max()                               # bf16: ~3 significant digits
    assert err_lean < 3 * err_hf + 1e-3                                      # no worse than HF's own bf16 forward


def test_generate_uses_it_for_bf16_only(monkeypatch):
    model, calls = model_of("llama"), []
    step = lean_decode.LeanDecoder.step
    monkeypatch.setattr(lean_decode.LeanDecoder, "step", lambda self, *a: calls.append(1) or step(self, *a))
    ids, pm = prompts()
    for dtype in ("float32", "bfloat16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            out = generate(model, ids, pm, SamplingSpec(group_size=2, max_new_tokens=4, dtype=dtype), eos_token_id=-1,
                           pad_token_id=0)
        assert out["completion_ids"].shape == (4, 4)
        assert len(calls) == (0 if dtype == "float32" else 3)                # the first token comes from the prefill


def test_models_it_does_not_cover_keep_hf_forward():
    sliding = Qwen2ForCausalLM(Qwen2Config(**ARCH, use_sliding_window=True, sliding_window=8))
    gelu = LlamaForCausalLM(LlamaConfig(**{**ARCH, "hidden_act": "gelu"}))
    assert not lean_decode.supports(sliding) and not lean_decode.supports(gelu)
    assert not lean_decode.supports(torch.nn.Linear(2, 2))


def test_a_torch_without_rms_norm_keeps_hf_forward(monkeypatch):
    """torch < 2.4 has no F.rms_norm (the package allows torch >= 2.2): generation keeps HF's forward."""
    model = model_of("llama")
    assert lean_decode.supports(model)
    monkeypatch.delattr(torch.nn.functional, "rms_norm")
    assert not lean_decode.supports(model)


@pytest.mark.skipif(not lean_decode.prepacked(torch.device("cpu"), torch.bfloat16),
                    reason="this CPU's oneDNN has no native bf16 matmul")
def test_prepacked_weights_give_the_same_logits_bit_for_bit(monkeypatch):
    """The oneDNN-reordered weights are a layout, not an approximation: every step's logits are those of
    ``F.linear`` on the plain bf16 weights, also after rows leave the batch (1–4 rows per multiply)."""
    model, G = model_of("qwen2"), 2                                      # Qwen2: q, k, v biases too
    ids, pm = prompts()
    tokens = torch.randint(1, 97, (2 * G, 4), generator=torch.Generator().manual_seed(3))

    def logits(packed: bool):
        monkeypatch.setattr(lean_decode, "prepacked", lambda device, dtype: packed)
        out, rows = [], torch.arange(2 * G)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            cache, _, attn, pos = _prefill(model, ids, pm, G, None)
            lean = lean_decode.LeanDecoder(model, cache, attn, 4)
            assert lean.packed is packed
            for s in range(4):
                if s == 2:
                    lean.select(torch.tensor([1, 3]))
                    rows, pos = rows[[1, 3]], pos[[1, 3]]
                out.append(lean.step(tokens[rows, s], pos + s))
        return out

    for got, want in zip(logits(True), logits(False), strict=True):
        assert torch.equal(got, want)


def test_weights_stay_plain_where_the_reorder_is_missing_or_differs(monkeypatch):
    """A torch build without the oneDNN ops, or one whose reordered products differ from ``F.linear``'s, keeps
    plain weights (the probe runs once per process)."""
    real_linear = torch.nn.functional.linear
    for broken in ("differs", "missing"):
        lean_decode._reorder_works.cache_clear()
        if broken == "differs":
            monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: real_linear(x, w, b) + 1)
        else:
            monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
            monkeypatch.setattr(torch.ops, "mkldnn", object())              # no such ops in this build
        try:
            assert not lean_decode.prepacked(torch.device("cpu"), torch.bfloat16)
        finally:
            monkeypatch.undo()
            lean_decode._reorder_works.cache_clear()
    assert not lean_decode.prepacked(torch.device("cpu"), torch.float32)
    assert not lean_decode.prepacked(torch.device("meta"), torch.bfloat16)
