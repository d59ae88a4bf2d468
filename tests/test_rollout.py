"""The built-in KV-cache sampler on the tiny model: shapes, EOS, log-probs, filters, prefill, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from lmpo.models.tiny import build_model, build_tokenizer
from lmpo.rollout import filter_logits, generate, rollout
from lmpo.rollout.sampler import SamplingSpec
from lmpo.rl.forward import completion_logp

PROMPTS = ["12+34=", "7+5=", "99+99="]          # different lengths: left padding matters
G, T = 4, 6


class Counting(torch.nn.Module):
    """Wraps a causal LM: records each forward's input_ids shape and adds ``eos_bias`` to the EOS
    logit (so random weights still stop at varied lengths)."""

    def __init__(self, model, eos_id, eos_bias=0.0):
        super().__init__()
        self.model, self.eos_id, self.eos_bias, self.calls = model, eos_id, eos_bias, []

    def forward(self, **kw):
        self.calls.append(tuple(kw["input_ids"].shape))
        out = self.model(**kw)
        if self.eos_bias:
            out.logits[..., self.eos_id] += self.eos_bias
        return out


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tok, hidden_size=64, num_layers=2, intermediate_size=128, num_heads=4, max_positions=64,
                       seed=0).eval()


def _rollout(model, tok, seed=0, **kw):
    args = dict(group_size=G, max_new_tokens=T, temperature=1.0)
    args.update(kw)
    gen = torch.Generator().manual_seed(seed)
    return rollout(model, tok, PROMPTS, [{"i": i} for i in range(len(PROMPTS))], SamplingSpec(**args), generator=gen)


def test_shapes_and_group_order(model, tok):
    b = _rollout(model, tok)
    N = len(PROMPTS) * G
    assert b.completion_ids.shape[0] == N and b.completion_ids.shape[1] <= T
    assert b.mask.shape == b.sampler_logp.shape == b.completion_ids.shape
    assert b.prompt_ids.shape[0] == b.prompt_mask.shape[0] == N and b.truncated.shape == (N,)
    assert b.prompts == [p for p in PROMPTS for _ in range(G)]
    assert [r["i"] for r in b.rows] == [i for i in range(len(PROMPTS)) for _ in range(G)]
    assert len(b.completions) == N and b.group_size == G
    # left padding: every prompt ends at the last column; the short prompt is padded on the left
    assert bool(b.prompt_mask[:, -1].all())
    assert int(b.prompt_mask[G].sum()) == len(tok("7+5=")["input_ids"]) < b.prompt_ids.shape[1]
    assert int(b.prompt_ids[G, 0]) == tok.pad_token_id


def test_eos_stops_each_sequence(model, tok):
    wrapped = Counting(model, tok.eos_token_id, eos_bias=4.0)
    b = _rollout(wrapped, tok, seed=1)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    lengths = b.mask.sum(-1).long()
    assert len(set(lengths.tolist())) >= 2, "the EOS bias should give varied lengths"
    for i in range(len(b)):
        ids, m, L = b.completion_ids[i], b.mask[i], int(lengths[i])
        assert m[:L].eq(1).all() and m[L:].eq(0).all(), "mask must be a prefix"
        hits = (ids == eos).nonzero().flatten().tolist()
        if b.truncated[i]:
            assert not hits and L == T
        else:
            assert hits[0] == L - 1, "the mask must end at (and include) the first EOS"
            assert ids[L:].eq(pad).all(), "tokens after EOS must be padding"
        assert b.sampler_logp[i, L:].eq(0).all() and (b.sampler_logp[i, :L] <= 0).all()
        assert eos not in tok(b.completions[i], add_special_tokens=False)["input_ids"]


def test_sampler_logp_equals_full_forward(model, tok):
    wrapped = Counting(model, tok.eos_token_id, eos_bias=2.0)
    for temperature in (1.0, 0.7):
        b = _rollout(wrapped, tok, seed=2, temperature=temperature)
        with torch.no_grad():
            logp, _, _ = completion_logp(wrapped, b, temperature)
        m = b.mask > 0
        torch.testing.assert_close(b.sampler_logp[m], logp[m], atol=1e-5, rtol=0)


def test_top_k_one_is_greedy_and_greedy_is_deterministic(model, tok):
    greedy = _rollout(model, tok, seed=0, temperature=0.0)
    again = _rollout(model, tok, seed=99, temperature=0.0)
    top1 = _rollout(model, tok, seed=5, temperature=1.0, top_k=1)
    assert torch.equal(greedy.completion_ids, again.completion_ids)
    assert torch.equal(greedy.completion_ids, top1.completion_ids)
    # greedy picks the argmax of the full forward at every real position
    with torch.no_grad():
        from lmpo.rl.forward import model_forward

        logits, _ = model_forward(model, greedy, greedy.completion_ids.shape[1])
    m = greedy.mask > 0
    assert torch.equal(logits.argmax(-1)[m], greedy.completion_ids[m])
    # all G samples of a prompt are the same under greedy decoding
    ids = greedy.completion_ids.view(len(PROMPTS), G, -1)
    assert torch.equal(ids, ids[:, :1].expand_as(ids))


def test_same_seed_same_samples(model, tok):
    a, b, c = _rollout(model, tok, seed=7), _rollout(model, tok, seed=7), _rollout(model, tok, seed=8)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.sampler_logp, b.sampler_logp)
    assert a.completions == b.completions
    assert not torch.equal(a.completion_ids, c.completion_ids) or a.completion_ids.shape != c.completion_ids.shape \
        or not torch.equal(a.sampler_logp, c.sampler_logp)


def test_filter_logits_hand_example():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])        # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    logits = probs.log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].nonzero().flatten().tolist()

    assert kept(top_p=0.5) == [1]               # 0.5 alone reaches 0.5
    assert kept(top_p=0.6) == [1, 3]            # the token that crosses the threshold is kept
    assert kept(top_p=0.8) == [1, 3]            # 0.5 + 0.3 reaches 0.8
    assert kept(top_p=0.81) == [0, 1, 3]
    assert kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(top_k=2) == [1, 3]
    assert kept(top_k=3, top_p=0.6) == [1, 3]
    assert kept(top_k=1, top_p=0.99) == [1]
    out = filter_logits(logits, top_p=0.6)
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]]), "kept logits must be unchanged"
    # rows are filtered independently
    two = torch.stack([logits[0], logits[0].flip(-1)])
    mask = torch.isfinite(filter_logits(two, top_p=0.6))
    assert mask[0].nonzero().flatten().tolist() == [1, 3] and mask[1].nonzero().flatten().tolist() == [0, 2]


def test_top_p_samples_only_the_support(model, tok):
    """With top_p small enough, every sampled token is in the (recomputed) nucleus."""
    b = _rollout(model, tok, seed=3, top_p=0.3)
    with torch.no_grad():
        from lmpo.rl.forward import model_forward

        logits, _ = model_forward(model, b, b.completion_ids.shape[1])
    allowed = torch.isfinite(filter_logits(logits.reshape(-1, logits.shape[-1]), top_p=0.3)).view(logits.shape)
    m = b.mask > 0
    picked = allowed.gather(-1, b.completion_ids[..., None]).squeeze(-1)
    assert picked[m].all()


def test_group_prefilled_once_and_finished_rows_leave(model, tok):
    wrapped = Counting(model, tok.eos_token_id, eos_bias=4.0)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(len(PROMPTS) * G, T, generator=gen).clamp_(min=1e-12)
    out = generate(wrapped, enc["input_ids"], enc["attention_mask"], SamplingSpec(group_size=G, max_new_tokens=T),
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, uniforms=u)
    calls = wrapped.calls
    assert calls[0] == tuple(enc["input_ids"].shape), "the prefill must see each prompt once (B rows, not B*G)"
    decode = calls[1:]
    assert len(decode) <= T - 1 and all(s[1] == 1 for s in decode), "decode steps feed one token per row"
    sizes = [s[0] for s in decode]
    lengths = out["mask"].sum(-1).long()
    assert sizes == [int((lengths > k).sum()) for k in range(1, len(sizes) + 1)], \
        "the decode batch must hold exactly the rows that have not emitted EOS"
    assert sizes[-1] < len(PROMPTS) * G, "finished rows should have left the batch"
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))


def test_greedy_logp_is_untempered_and_finite(model, tok):
    b = _rollout(model, tok, temperature=0.0)
    m = b.mask > 0
    assert torch.isfinite(b.sampler_logp[m]).all() and (b.sampler_logp[m] <= 0).all()
    assert not math.isclose(float(b.sampler_logp[m].sum()), 0.0)
