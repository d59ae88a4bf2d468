"""The training forward computes each group's prompt once and gives the full forward's log-probs
and gradients."""

from __future__ import annotations

import pytest
import torch

from lmpo.models.load import load_causal_lm, load_tokenizer
from lmpo.rollout.sampler import SamplingSpec, rollout
from lmpo.rl import forward as F

PROMPTS = ["12+5=", "7+300=", "1+1=", "99+1="]


def _batch(tiny_dir, G=3, T=6):
    model = load_causal_lm(str(tiny_dir), torch.device("cpu"))
    b = rollout(model, load_tokenizer(str(tiny_dir)), PROMPTS, [{}] * len(PROMPTS),
                SamplingSpec(group_size=G, max_new_tokens=T), seeds=[1, 2, 3, 4])
    return model, b


def _full(model, batch, T):
    ids, attn, pos = F.sequence_inputs(batch)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, logits_to_keep=T + 1,
                output_hidden_states=True)
    return out.logits[:, :T], out.hidden_states[-1][:, -T - 1:-1]


def _grads(model, logits, batch):
    obj = (F.token_logp(logits, batch.completion_ids)[0] * batch.mask).sum()
    return torch.autograd.grad(obj, [p for p in model.parameters() if p.requires_grad])


def test_prompt_segments_follow_runs_of_equal_prompts(tiny_dir):
    _, b = _batch(tiny_dir)
    assert F.prompt_segments(b).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    part = b.select(torch.tensor([2, 3, 4, 5, 9, 1]))          # groups cut and reordered, as micro-batches may
    assert F.prompt_segments(part).tolist() == [0, 1, 1, 1, 2, 3]
    assert F.prompt_segments(b.select(torch.tensor([0, 3, 6, 9]))) is None      # nothing repeats: full forward


def test_shared_prompt_forward_equals_full_forward(tiny_dir):
    model, b = _batch(tiny_dir)
    model.double()                                       # float64: differences are the method's, not rounding
    T = b.completion_ids.shape[1]
    assert b.prompt_mask.sum(-1).unique().numel() > 1 and (b.mask.sum(-1) < T).any()   # left pads and early EOS
    for rows in (torch.arange(len(b)), torch.tensor([2, 3, 4, 5, 9, 1, 10])):
        mb = b.select(rows)
        shared, h_shared = F._shared_prompt_forward(model, mb, T, F.prompt_segments(mb), hidden=True)
        full, h_full = _full(model, mb, T)
        real = mb.mask > 0
        torch.testing.assert_close(shared[real], full[real], atol=1e-10, rtol=0)
        torch.testing.assert_close(h_shared[real], h_full[real], atol=1e-10, rtol=0)
        # gradients: measured ≤ 4e-7 absolute on entries up to ~8 (≤ 5e-8 of the largest), even in float64;
        # the attention backward runs on differently shaped problems in the two paths
        for gs, gf in zip(_grads(model, shared, mb), _grads(model, full, mb)):
            torch.testing.assert_close(gs, gf, atol=1e-6, rtol=1e-6)
    # completion_logp takes the shared path and gives the same log-probs
    logp, _, _ = F.completion_logp(model, b, 1.0)
    ref = F.token_logp(_full(model, b, T)[0], b.completion_ids)[0] * b.mask
    torch.testing.assert_close(logp, ref, atol=1e-10, rtol=0)


def test_no_sharing_with_gradient_checkpointing_or_routing(tiny_dir):
    model, b = _batch(tiny_dir)
    assert F._can_share_prompt(model, b, {})
    model.gradient_checkpointing_enable()
    assert not F._can_share_prompt(model, b, {})
    model.gradient_checkpointing_disable()
    b.routing = [torch.zeros(len(b), 1, 1, dtype=torch.long)]
    assert not F._can_share_prompt(model, b, {})


def test_padding_free_forward_equals_padded_forward(tiny_dir):
    """padding_free packs the completions into one sequence per piece: the log-probs, entropies, a
    value head's values and the gradients equal the padded forward's (float64) on real tokens, for
    whole groups, cut groups, rows that share no prompt, a row with no real token, and small pieces."""
    model, b = _batch(tiny_dir)
    model.double()
    T = b.completion_ids.shape[1]
    assert b.prompt_mask.sum(-1).unique().numel() > 1 and (b.mask.sum(-1) < T).any()   # left pads and early EOS
    b.mask[4] = 0                                                  # an invalid sample: no real token
    head = torch.nn.Linear(model.config.hidden_size, 1).double()
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    packed_pieces = []
    real_forward = F._packed_forward
    for rows in (torch.arange(len(b)), torch.tensor([2, 3, 4, 5, 9, 1, 10]), torch.tensor([0, 3, 6, 9])):
        mb = b.select(rows)
        real = mb.mask > 0
        full, h_full = _full(model, mb, T)                         # float64 throughout
        la = (full / 0.7).log_softmax(-1)
        ref = (la.gather(-1, mb.completion_ids[..., None]).squeeze(-1), -(la.exp() * la).sum(-1), head(h_full).squeeze(-1))
        ref_grads = torch.autograd.grad(ref[0][real].sum() + ref[2][real].sum(), params)
        for budget in (4096, 5):
            F._packed_forward = lambda *a, **k: packed_pieces.append(1) or real_forward(*a, **k)
            try:
                got = F.packed_completion_logp(model, mb, 0.7, with_entropy=True, value_head=head, budget=budget)
            finally:
                F._packed_forward = real_forward
            for x, y in zip(got, ref):
                torch.testing.assert_close(x[real], y[real], atol=1e-10, rtol=0)
            assert (got[0][~real] == 0).all()
            # gradients: ≤ 6e-8 of the largest entry, as the shared-prompt test measures (attention backward shapes)
            for gp, gr in zip(torch.autograd.grad(got[0].sum() + got[2][real].sum(), params), ref_grads):
                torch.testing.assert_close(gp, gr, atol=1e-7 * float(gr.abs().max()), rtol=0)
    assert len(packed_pieces) > 6                                  # budget 5 split the batches into pieces
    # completion_logp takes the packed path when asked, not with environment tokens inside completions
    assert F.completion_logp(model, b, 1.0, padding_free=True)[0].dtype == torch.float64      # the packed path's
    assert F.completion_logp(model, b, 1.0)[0].dtype == torch.float32                          # token_logp's
    b.seq_mask = b.mask.clone()
    assert F._can_share_prompt(model, b, {}) and not F._can_pack(model, b, {})
    assert F.completion_logp(model, b, 1.0, padding_free=True)[0].dtype == torch.float32


def test_chunked_logp_matches_log_softmax_and_its_gradient():
    """ChunkedLogp (no float32 copy of the logits kept): the values of log_softmax(z / τ)[a] and, by
    gradcheck in float64, its exact gradient, across chunk boundaries; bf16 logits get a bf16 gradient."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(11, (7,), generator=g)
    for tau in (1.0, 0.7):
        ref = (logits / tau).log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(F.ChunkedLogp.apply(logits, tokens, tau, 3).double(), ref, atol=1e-6, rtol=0)
        assert torch.autograd.gradcheck(lambda z: F.ChunkedLogp.apply(z, tokens, tau, 3), (logits,))
        ent = -((logits / tau).softmax(-1) * (logits / tau).log_softmax(-1)).sum(-1)
        torch.testing.assert_close(F.chunked_entropy(logits, tau, chunk=2).double(), ent, atol=1e-5, rtol=0)
    half = logits.detach().bfloat16().requires_grad_()
    F.ChunkedLogp.apply(half, tokens, 1.0, 3).sum().backward()
    assert half.grad.dtype == torch.bfloat16 and half.grad.abs().sum() > 0


def test_padding_free_refuses_a_cache_it_cannot_pack(tiny_dir, monkeypatch):
    """A model whose KV cache is not a plain per-layer cache (sliding-window or hybrid layers) is a
    clear error naming the key, not a silently wrong mask."""
    import pytest

    from lmpo.config import ConfigError

    model, b = _batch(tiny_dir)
    real_cache = F.output_cache

    class SlidingLayer:                                              # stands in for a sliding-window layer
        pass

    def sliding(out):
        cache = real_cache(out)
        cache.layers[0] = SlidingLayer()
        return cache

    monkeypatch.setattr(F, "output_cache", sliding)
    with pytest.raises(ConfigError, match="padding_free"):
        F.completion_logp(model, b, 1.0, padding_free=True)


def test_padding_free_forward_is_exact_with_eager_attention(tiny_dir):
    """The packed forward's 4-D mask is additive (0 or the dtype's minimum), which every attention
    implementation reads alike: with eager attention, which adds the mask to the scores, the log-probs
    equal the padded forward's under sdpa (a boolean mask added as 0/1 would let every token see all)."""
    model, b = _batch(tiny_dir)
    real = b.mask > 0
    T = b.completion_ids.shape[1]
    model.set_attn_implementation("sdpa")
    full, _ = _full(model, b, T)
    ref = full.log_softmax(-1).gather(-1, b.completion_ids[..., None]).squeeze(-1)
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"
    got = F.packed_completion_logp(model, b, 1.0)[0]
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)
    from lmpo.config import ConfigError

    model.config._attn_implementation = "flash_attention_2"      # cannot take a 4-D mask: refused, not ignored
    with pytest.raises(ConfigError, match="padding_free.*flash_attention_2"):
        F.packed_completion_logp(model, b, 1.0)
