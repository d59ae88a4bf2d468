"""Keep routing (lmpo.models.moe) on tiny random MoE models built from transformers configs.

Generation follows lmpo/rollout/sampler.py: one prefill over the left-padded prompts, the cache
expanded to G samples per prompt (``batch_repeat_interleave``), one decode forward per token, and
rows that finish leave the batch (``batch_select_indices``)."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, \
    Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from lmpo.models.moe import RoutingRecorder, RoutingReplay, find_routers, is_moe

V, H, L, E, K = 100, 64, 2, 4, 2
B, G, P, T = 2, 3, 5, 6
N = B * G
COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, num_experts_per_tok=K, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def mixtral():
    return MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=E))


def qwen3_moe():  # norm_topk_prob=False: the chosen experts' softmax weights are not renormalized
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, head_dim=16, num_experts=E, moe_intermediate_size=32,
                                              norm_topk_prob=False))


def qwen2_moe():  # with a shared expert
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, intermediate_size=96, num_experts=E, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=32))


BUILDERS = {"mixtral": mixtral, "qwen3_moe": qwen3_moe, "qwen2_moe": qwen2_moe}


def build(name, seed=0):
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    with torch.no_grad():  # routers start near uniform (std 0.02); make the choices less tie-prone
        for r in find_routers(model):
            r.weight.normal_(0, 0.3)
    return model


def prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (B, P), generator=g)
    mask = torch.ones(B, P, dtype=torch.long)
    mask[1, :2] = 0                                    # left padding
    ids[mask == 0] = 0
    return ids, mask


# the step (0-based) at which each of the N rows emits EOS; T means "never" (truncated)
FINISH = torch.tensor([1, T, 3, 0, T, 4])


@torch.no_grad()
def generate(model, rec):
    """Greedy KV-cache generation, with forced EOS at ``FINISH``; returns the training inputs."""
    ids, pmask = prompts()
    pos = (pmask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=pmask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(G)
    rec.expand(G)
    logits = out.logits[:, -1].repeat_interleave(G, 0)
    attn, next_pos = pmask.repeat_interleave(G, 0), pos[:, -1].repeat_interleave(G, 0) + 1
    tokens = torch.zeros(N, T, dtype=torch.long)
    alive = torch.arange(N)
    for t in range(T):
        tok = logits[:, 3:].argmax(-1) + 3
        done = FINISH[alive] == t
        tok[done] = 2
        tokens[alive, t] = tok
        if t == T - 1:
            break
        if done.any():
            stay = (~done).nonzero().squeeze(-1)
            if stay.numel() == 0:
                break
            cache.batch_select_indices(stay)
            rec.select(stay)
            alive, tok, attn, next_pos = alive[stay], tok[stay], attn[stay], next_pos[stay]
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], 1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    lengths = (FINISH + 1).clamp(max=T)
    cmask = (torch.arange(T)[None] < lengths[:, None]).long()
    full_ids = torch.cat([ids.repeat_interleave(G, 0), tokens * cmask], 1)
    full_mask = torch.cat([pmask.repeat_interleave(G, 0), cmask], 1)
    return full_ids, full_mask, tokens, cmask


def full_forward(model, full_ids, full_mask):
    pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=full_ids, attention_mask=full_mask, position_ids=pos, use_cache=False).logits


def completion_logp(logits, tokens, cmask):
    lg = logits[:, P - 1:-1].float()
    return (lg.gather(-1, tokens[..., None]).squeeze(-1) - lg.logsumexp(-1)) * cmask


def record_rollout(model):
    with RoutingRecorder(model) as rec:
        full_ids, full_mask, tokens, cmask = generate(model, rec)
    return rec.routing(width=full_ids.shape[1]), full_ids, full_mask, tokens, cmask


def record_full(model, full_ids, full_mask, routing=None):
    """Expert ids of a full forward (under replay of ``routing`` when given), and its logits."""
    with RoutingReplay(model, routing) if routing is not None else _null(), RoutingRecorder(model) as rec:
        logits = full_forward(model, full_ids, full_mask)
    return rec.routing(), logits


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_find_routers_and_dense():
    for name in BUILDERS:
        model = build(name)
        routers = find_routers(model)
        assert len(routers) == L and is_moe(model)
        assert routers == [layer.mlp.gate for layer in model.model.layers]
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=96, num_hidden_layers=L,
                                         num_attention_heads=4, num_key_value_heads=2))
    assert find_routers(dense) == [] and not is_moe(dense)
    with RoutingRecorder(dense) as rec:
        ids = torch.randint(3, V, (2, 4))
        dense(input_ids=ids)
        rec.expand(2)
        rec.select(torch.tensor([0]))
    assert rec.routing() == [] and rec.routing(width=9) == []
    with RoutingReplay(dense, []):
        dense(input_ids=ids)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_recorded_table_layout(name):
    model = build(name)
    routing, full_ids, full_mask, tokens, cmask = record_rollout(model)
    assert len(routing) == L
    for r in routing:
        assert r.shape == (N, P + T, K) and r.dtype == torch.long
        assert ((r >= -1) & (r < E)).all()
        assert (r[:, :P] >= 0).all()                                   # the prompt, padding included
        assert torch.equal(r[:, :P], r[::G, :P].repeat_interleave(G, 0))  # one prefill per group
        for i in range(N):
            fed = int(min(FINISH[i] + 1, T)) - 1                        # completion tokens fed back
            assert (r[i, P:P + fed] >= 0).all() and (r[i, P + fed:] == -1).all()
        # two different experts per token where routed
        ok = r[..., 0] >= 0
        assert (r[..., 0] != r[..., 1])[ok].all()
    # columns line up with the training forward: the unperturbed full forward agrees almost everywhere
    full, _ = record_full(model, full_ids, full_mask)
    for r, f in zip(routing, full):
        ok = r[..., 0] >= 0
        same = (r.sort(-1).values == f.sort(-1).values).all(-1)[ok].float().mean()
        assert same > 0.95, same


@pytest.mark.parametrize("name", list(BUILDERS))
def test_replay_bit_identical_after_policy_update(name):
    model = build(name)
    routing, full_ids, full_mask, tokens, cmask = record_rollout(model)
    updated = copy.deepcopy(model)                                     # a policy update moves the routers
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for r in find_routers(updated):
            r.weight.add_(0.15 * torch.randn(r.weight.shape, generator=g))
    with torch.no_grad():
        free, free_logits = record_full(updated, full_ids, full_mask)
        kept, kept_logits = record_full(updated, full_ids, full_mask, routing)
    mismatched = 0
    for r, f, k in zip(routing, free, kept):
        ok = r >= 0
        assert torch.equal(k[ok], r[ok])                               # replay: exactly the recorded experts
        mismatched += int((f[ok] != r[ok]).sum())
    assert mismatched > 0                                              # without replay: other experts
    lp_free = completion_logp(free_logits, tokens, cmask)
    lp_kept = completion_logp(kept_logits, tokens, cmask)
    assert not torch.allclose(lp_free, lp_kept)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_replaying_own_routing_is_the_plain_forward(name):
    """Replaying the routing a forward chose itself reproduces that forward bit for bit: the
    weights are recomputed exactly as the model does (incl. its norm_topk_prob)."""
    model = build(name)
    full_ids = torch.randint(3, V, (3, 7))
    full_mask = torch.ones_like(full_ids)
    with torch.no_grad():
        own, logits = record_full(model, full_ids, full_mask)
        again, replayed = record_full(model, full_ids, full_mask, own)
    assert all(torch.equal(a, b) for a, b in zip(own, again))
    assert torch.equal(logits, replayed)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_replay_gradients_reach_the_router(name):
    model = build(name).train()
    routing, full_ids, full_mask, tokens, cmask = record_rollout(model.eval())
    model.train()
    with RoutingReplay(model, routing):
        logp = completion_logp(full_forward(model, full_ids, full_mask), tokens, cmask)
    logp.sum().backward()
    for r in find_routers(model):
        assert r.weight.grad is not None and torch.isfinite(r.weight.grad).all() and r.weight.grad.abs().sum() > 0
    # the hooks are gone after the context
    assert all(not r._forward_hooks for r in find_routers(model)) and not model._forward_pre_hooks


def test_replay_with_gradient_checkpointing():
    model = build("mixtral")
    routing, full_ids, full_mask, tokens, cmask = record_rollout(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    with RoutingReplay(model, routing):
        logp = completion_logp(full_forward(model, full_ids, full_mask), tokens, cmask)
        logp.sum().backward()
    assert all(r.weight.grad.abs().sum() > 0 for r in find_routers(model))


def test_protocol_errors():
    model = build("mixtral")
    ids = torch.randint(3, V, (2, 4))
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(input_ids=ids, use_cache=True)
        with pytest.raises(RuntimeError, match="rec.expand"):   # cache expanded, recorder not told
            model(input_ids=ids.repeat_interleave(2, 0)[:, :1], past_key_values=None)
    routing = rec.routing()
    assert routing[0].shape == (2, 4, K)
    with pytest.raises(RuntimeError, match="rows"):
        with RoutingReplay(model, routing), torch.no_grad():
            model(input_ids=torch.randint(3, V, (3, 4)))
    with pytest.raises(ValueError, match="layers"):
        RoutingReplay(model, routing[:1])
    with pytest.raises(ValueError, match="no routing"):
        RoutingReplay(model, None)
    # a shorter sequence is fine when the dropped columns were never routed
    with RoutingReplay(model, [torch.cat([r, r.new_full((2, 3, K), -1)], 1) for r in routing]), torch.no_grad():
        model(input_ids=ids)


class FakeTopkRouter(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(E, H))


class FakeMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Module()
        self.block.gate = FakeTopkRouter()
        self.block.experts = nn.ModuleList([nn.Linear(H, H) for _ in range(E)])


class LegacyMoE(nn.Module):  # pre-v5 style: a Linear gate next to the experts
    def __init__(self):
        super().__init__()
        self.block = nn.Module()
        self.block.gate = nn.Linear(H, E, bias=False)
        self.block.experts = nn.ModuleList([nn.Linear(H, H) for _ in range(E)])


@pytest.mark.parametrize("cls", [FakeMoE, LegacyMoE])
def test_unsupported_router_is_a_clear_error(cls):
    model = cls()
    assert is_moe(model) and find_routers(model) == [model.block.gate]
    with pytest.raises(NotImplementedError, match="not supported"):
        RoutingRecorder(model)
    with pytest.raises(NotImplementedError, match="not supported"):
        RoutingReplay(model, [torch.zeros(1, 1, K, dtype=torch.long)])
