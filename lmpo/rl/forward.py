"""Training-side forward passes over a ``RolloutBatch``: completion log-probs, entropy, values.

Log-probs are computed for completion tokens only: the model returns logits for the last T+1
positions (``logits_to_keep``), and log π(a_t) = logit[a_t] − logsumexp(logits), in row chunks so
no float32 ``[N, T, vocab]`` copy of the whole batch is made at once. The G samples of a group
share their prompt, so it is computed once per group (with a KV cache that the completions attend
to, gradients flowing through it), not G times. With ``padding_free`` the completions of all rows run
as one packed sequence under a block mask, so padding costs nothing (``packed_completion_logp``).
"""

from __future__ import annotations

import torch

from lmpo.algorithms import sampling_support_logp
from lmpo.config import ConfigError
from lmpo.models.load import cache_kw, output_cache
from lmpo.models.moe import RoutingReplay


def sequence_inputs(batch):
    """input_ids, attention_mask, position_ids [N, P+T] for prompt + completion (environment tokens of a
    multi-turn episode are attended to: ``seq_mask``; only ``mask`` is the loss mask)."""
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    seen = batch.mask if batch.seq_mask is None else batch.seq_mask
    attn = torch.cat([batch.prompt_mask, seen.to(batch.prompt_mask.dtype)], 1)
    pos = (attn.long().cumsum(-1) - 1).clamp(min=0)
    return ids, attn, pos


def model_forward(model, batch, T: int, hidden: bool = False, **extra):
    """Logits [N, T, V] at the positions that predict the T completion tokens (and the last hidden
    states there when ``hidden``). With ``batch.routing`` (keep routing) every MoE router is forced
    to the experts recorded at sampling."""
    if batch.routing is not None:
        with RoutingReplay(model, batch.routing):
            return _model_forward(model, batch, T, hidden, **extra)
    return _model_forward(model, batch, T, hidden, **extra)


def prompt_segments(batch) -> torch.Tensor | None:
    """[N] index of each row's run of consecutive rows with the same prompt (a group, as the rollout
    lays them out), or None when no prompt repeats (sharing would not save anything)."""
    ids, m = batch.prompt_ids, batch.prompt_mask
    if ids.shape[0] < 2:
        return None
    new = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    new[1:] = (ids[1:] != ids[:-1]).any(-1) | (m[1:] != m[:-1]).any(-1)
    if bool(new.all()):
        return None
    return new.long().cumsum(0) - 1


def _can_share_prompt(model, batch, extra) -> bool:
    """The shared-prompt forward needs a KV cache in training: not with routing replay (the routing
    tables are per row), gradient checkpointing (HF drops the cache in checkpointed layers) or extra
    model arguments."""
    if batch.routing is not None or extra or not batch.prompt_ids.shape[1]:
        return False
    return not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _shared_prompt_forward(model, batch, T: int, seg: torch.Tensor, hidden: bool):
    """The full forward's logits (and hidden states) at the T positions predicting the completion,
    computing each distinct prompt once: the prompts run with a cache, the cache's rows are repeated
    to the batch's rows (``seg``, differentiably), and only completion tokens 0 … T−2 run on top.
    The positions predicting token 0 are the prompts' last positions."""
    ids, attn, pos = sequence_inputs(batch)
    P = batch.prompt_ids.shape[1]
    first = torch.ones_like(seg, dtype=torch.bool)
    first[1:] = seg[1:] != seg[:-1]
    rows = first.nonzero().squeeze(-1)                                          # one row per distinct prompt
    out = model(input_ids=ids[rows, :P], attention_mask=attn[rows, :P], position_ids=pos[rows, :P], use_cache=True,
                logits_to_keep=1, output_hidden_states=hidden)
    logits = out.logits[:, -1:][seg]                                            # [N, 1, V]
    h = out.hidden_states[-1][:, -1:][seg] if hidden else None
    if T > 1:
        cache = output_cache(out)
        cache.batch_select_indices(seg)
        out2 = model(input_ids=ids[:, P:P + T - 1], attention_mask=attn[:, :P + T - 1], position_ids=pos[:, P:P + T - 1],
                     **cache_kw(model, cache), use_cache=True, output_hidden_states=hidden)
        logits = torch.cat([logits, out2.logits], 1)                            # [N, T, V]
        if hidden:
            h = torch.cat([h, out2.hidden_states[-1]], 1)
    return logits, h


def _model_forward(model, batch, T: int, hidden: bool = False, **extra):
    seg = prompt_segments(batch) if _can_share_prompt(model, batch, extra) else None
    if seg is not None:
        return _shared_prompt_forward(model, batch, T, seg, hidden)
    ids, attn, pos = sequence_inputs(batch)
    kw = dict(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=False, **extra)
    if hidden:
        kw["output_hidden_states"] = True
    try:
        out = model(**kw, logits_to_keep=T + 1)
        logits = out.logits[:, :T]
    except TypeError:  # a model without logits_to_keep
        out = model(**kw)
        logits = out.logits[:, -T - 1:-1]
    h = out.hidden_states[-1][:, -T - 1:-1] if hidden else None
    return logits, h                                                            # [N, T, V], [N, T, H]


def token_logp(logits, tokens, temperature: float = 1.0, keep_mask=None, with_entropy: bool = False, chunk: int = 64):
    """log π(tokens) [N, T] (and the entropy of π per token when asked) from logits [N, T, V].

    With ``keep_mask`` [N, T, V] the distribution is renormalized over the kept sampling support
    (DeepSeek-V3.2's "keep sampling mask")."""
    logps, ents = [], []
    for s in range(0, logits.shape[0], chunk):
        lg = logits[s:s + chunk].float()
        if temperature != 1.0 and temperature > 0:
            lg = lg / temperature
        tok = tokens[s:s + chunk, :, None]
        if keep_mask is not None:
            logp_all = sampling_support_logp(lg, keep_mask[s:s + chunk])
            logps.append(logp_all.gather(-1, tok).squeeze(-1))
        else:
            logps.append(lg.gather(-1, tok).squeeze(-1) - torch.logsumexp(lg, -1))
            logp_all = None
        if with_entropy:
            with torch.no_grad():
                la = logp_all if logp_all is not None else lg.log_softmax(-1)
                p = la.exp()
                ents.append(-(torch.where(p > 0, p * la, torch.zeros_like(p))).sum(-1))
    logp = torch.cat(logps)
    return (logp, torch.cat(ents)) if with_entropy else (logp, None)


def _can_pack(model, batch, extra) -> bool:
    """Padding-free packing needs what the shared-prompt forward needs, and completions whose attended
    tokens are a prefix (no environment tokens inside: ``seq_mask``)."""
    return batch.seq_mask is None and _can_share_prompt(model, batch, extra)


def _packed_pieces(seg: torch.Tensor, lengths: torch.Tensor, budget: int) -> list[torch.Tensor]:
    """Row indices split at group boundaries into pieces of about ``budget`` packed tokens (the dense
    attention mask of a piece is [tokens, prompts + tokens])."""
    pieces, start, used = [], 0, 0
    seg, lengths = seg.tolist(), lengths.tolist()
    for i, (s, n) in enumerate(zip(seg, lengths)):
        if i > start and s != seg[i - 1] and used + n > budget:
            pieces.append(torch.arange(start, i))
            start, used = i, 0
        used += n
    pieces.append(torch.arange(start, len(seg)))
    return pieces


def _packed_forward(model, batch, lengths: torch.Tensor, hidden: bool):
    """Logits [M, V] (and last hidden states [M, H]) at the M = Σ lengths positions that predict each
    row's first ``lengths[i]`` completion tokens, with no padding: each distinct prompt runs once with
    a cache (its last position predicts token 0), then the completion tokens 0 … L_i − 2 of all rows
    run as one sequence whose 4-D attention mask lets token t of row i see its group's prompt (real
    tokens only) and tokens 0 … t of row i, at the positions the padded forward gives them. Also
    returns the (row, t) index of each of the M positions."""
    mask_form = packed_mask_form(model)
    seg = prompt_segments(batch)
    N, dev = batch.prompt_ids.shape[0], batch.prompt_ids.device
    seg = torch.arange(N, device=dev) if seg is None else seg
    first = torch.ones_like(seg, dtype=torch.bool)
    first[1:] = seg[1:] != seg[:-1]
    rows = first.nonzero().squeeze(-1)                                          # one row per distinct prompt
    pm = batch.prompt_mask[rows]
    B, P = pm.shape
    pos_p = (pm.long().cumsum(-1) - 1).clamp(min=0)
    n_in = (lengths - 1).clamp(min=0)                                           # inputs: tokens 0 … L_i − 2
    S = int(n_in.sum())
    row_of = torch.repeat_interleave(torch.arange(N, device=dev), n_in)         # [S]
    off = torch.arange(S, device=dev) - torch.repeat_interleave(n_in.cumsum(0) - n_in, n_in)
    x_prompt, x_packed = _embed_once(model, batch.prompt_ids[rows], batch.completion_ids[row_of, off][None])
    out = model(**x_prompt, attention_mask=pm, position_ids=pos_p, use_cache=True, logits_to_keep=1,
                output_hidden_states=hidden)
    has = lengths > 0
    r0 = has.nonzero().squeeze(-1)                                              # rows with a token 0
    logits, hs = [out.logits[:, -1][seg[r0]]], [out.hidden_states[-1][:, -1][seg[r0]]] if hidden else []
    idx_r, idx_t = [r0], [torch.zeros_like(r0)]
    if S:
        plen = batch.prompt_mask.sum(-1).long()
        cache = output_cache(out)
        if any(type(layer).__name__ != "DynamicLayer" for layer in getattr(cache, "layers", [None])):
            raise ConfigError("config key 'padding_free': this model's KV cache is not a plain per-layer cache "
                              f"({type(cache).__name__}: sliding-window or hybrid layers); set padding_free=false.")
        for layer in cache.layers:                                              # [B, H, P, D] -> [1, H, B·P, D]
            layer.keys = layer.keys.transpose(0, 1).reshape(1, layer.keys.shape[1], B * P, -1)
            layer.values = layer.values.transpose(0, 1).reshape(1, layer.values.shape[1], B * P, -1)
        key_group = torch.arange(B, device=dev).repeat_interleave(P)                        # [B·P]
        see_prompt = (seg[row_of][:, None] == key_group[None]) & (pm.reshape(-1) > 0)[None]
        see_own = (row_of[:, None] == row_of[None]) & (off[None] <= off[:, None])
        mask = mask_form(torch.cat([see_prompt, see_own], 1)[None, None], x_packed["inputs_embeds"].dtype)
        out2 = model(**x_packed, attention_mask=mask,
                     position_ids=(plen[row_of] + off)[None], **cache_kw(model, cache), use_cache=True,
                     output_hidden_states=hidden)
        logits.append(out2.logits[0])
        if hidden:
            hs.append(out2.hidden_states[-1][0])
        idx_r.append(row_of)
        idx_t.append(off + 1)
    return torch.cat(logits), (torch.cat(hs) if hidden else None), (torch.cat(idx_r), torch.cat(idx_t))


def packed_mask_form(model):
    """How the model's attention reads the packed sequence's 4-D mask (True: the query sees the key):
    as is for sdpa; for eager attention, which adds the mask to the scores, as 0 where seen and the
    dtype's minimum elsewhere. Other implementations (flash attention) cannot take a 4-D mask: refused
    before any forward."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if impl == "sdpa":
        return lambda seen, dtype: seen
    if impl == "eager":
        return lambda seen, dtype: torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(
            ~seen, torch.finfo(dtype).min)
    raise ConfigError(f"config key 'padding_free': the model's attention implementation '{impl}' cannot take the "
                      "packed sequence's 4-D mask (sdpa and eager can); set padding_free=false.")


def _embed_once(model, *ids: torch.Tensor) -> list[dict]:
    """The model inputs for each of ``ids``, as ``inputs_embeds`` from one embedding lookup over all of them,
    so the backward builds one dense [vocab, hidden] embedding gradient, not one per forward (SmolLM2: 113 MB
    zero-filled and added each); ``input_ids`` for a model without ``get_input_embeddings``."""
    inner = getattr(model, "module", model)                                     # DDP
    embed = inner.get_input_embeddings() if hasattr(inner, "get_input_embeddings") else None
    if embed is None:
        return [{"input_ids": x} for x in ids]
    flat = embed(torch.cat([x.reshape(-1) for x in ids]))
    return [{"inputs_embeds": e.view(*x.shape, -1)} for x, e in zip(ids, flat.split([x.numel() for x in ids]))]


class ChunkedLogp(torch.autograd.Function):
    """log π(a) = z_a − logsumexp(z), z = logits / τ, over logits [M, V] of any float dtype, in float32
    row chunks without keeping a float32 copy of the logits: backward recomputes each chunk's softmax,
    ∂ log π(a) / ∂ logits = (onehot(a) − softmax(z)) / τ."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature: float, chunk: int):
        lse = torch.empty(logits.shape[0], device=logits.device, dtype=torch.promote_types(logits.dtype, torch.float32))
        out = torch.empty_like(lse)
        for s in range(0, logits.shape[0], chunk):
            z = _scaled(logits[s:s + chunk], temperature)
            lse[s:s + chunk] = torch.logsumexp(z, -1)
            out[s:s + chunk] = z.gather(-1, tokens[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, tokens, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, g):
        logits, tokens, lse = ctx.saved_tensors
        grad, c = torch.empty_like(logits), ctx.chunk
        for s in range(0, logits.shape[0], c):
            gs = g[s:s + c, None].to(lse.dtype)
            d = (_scaled(logits[s:s + c], ctx.temperature) - lse[s:s + c, None]).exp_().mul_(-gs)
            d.scatter_add_(-1, tokens[s:s + c, None], gs)
            grad[s:s + c] = d / ctx.temperature if ctx.temperature != 1.0 and ctx.temperature > 0 else d
        return grad, None, None, None


def _scaled(logits, temperature: float):
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return z / temperature if temperature != 1.0 and temperature > 0 else z


@torch.no_grad()
def chunked_entropy(logits, temperature: float, chunk: int = 256):
    """H(π) per row of logits [M, V], in float32 row chunks."""
    out = []
    for s in range(0, logits.shape[0], chunk):
        la = _scaled(logits[s:s + chunk], temperature).log_softmax(-1)
        p = la.exp()
        out.append(-torch.where(p > 0, p * la, torch.zeros_like(p)).sum(-1))
    return torch.cat(out)


def packed_completion_logp(model, batch, temperature: float, keep_sampling_mask: bool = False,
                           with_entropy: bool = False, value_head=None, budget: int = 4096):
    """``completion_logp`` without padding (``padding_free: true``): each row's completion up to its
    last real token, rows packed into one sequence per piece of about ``budget`` tokens; the same
    values as the padded forward up to float rounding, zero past each row's last real token."""
    N, T = batch.completion_ids.shape
    real = batch.mask > 0
    lengths = torch.where(real.any(-1), T - real.flip(-1).int().argmax(-1), 0)   # through the last real token
    seg = prompt_segments(batch)
    dev, dt = batch.mask.device, torch.promote_types(next(model.parameters()).dtype, torch.float32)
    logp = torch.zeros(N, T, device=dev, dtype=dt)
    ent = torch.zeros(N, T, device=dev, dtype=dt) if with_entropy else None
    values = torch.zeros(N, T, device=dev, dtype=dt) if value_head is not None else None
    for piece in _packed_pieces(torch.arange(N) if seg is None else seg, lengths, budget):
        piece = piece.to(real.device)
        sub = batch.select(piece) if piece.numel() < N else batch
        logits, h, (r, t) = _packed_forward(model, sub, lengths[piece], value_head is not None)
        r = piece[r]
        if keep_sampling_mask:
            lp, e = token_logp(logits[:, None], batch.completion_ids[r, t][:, None], temperature,
                               batch.keep_mask[r, t][:, None], with_entropy, chunk=256)
            lp, e = lp[:, 0], (e[:, 0] if with_entropy else None)
        else:
            lp = ChunkedLogp.apply(logits, batch.completion_ids[r, t], temperature, 256)
            e = chunked_entropy(logits, temperature) if with_entropy else None
        logp = logp.index_put((r, t), lp.to(dt))
        if with_entropy:
            ent = ent.index_put((r, t), e.to(dt))
        if value_head is not None:
            values = values.index_put((r, t), value_head(h).squeeze(-1).to(dt))
    logp = torch.where(real, logp, torch.zeros_like(logp))
    return logp, ent, values


def completion_logp(model, batch, temperature: float, keep_sampling_mask: bool = False, with_entropy: bool = False,
                    value_head=None, padding_free: bool = False, **extra):
    """(logp [N, T], entropy [N, T] | None, values [N, T] | None) of the batch's completions under ``model``.

    ``value_head``: a scalar head on the policy's last hidden states (``critic: shared``).
    ``padding_free``: no compute on padding (``packed_completion_logp``) where the batch allows it."""
    if padding_free and _can_pack(model, batch, extra):
        return packed_completion_logp(model, batch, temperature, keep_sampling_mask, with_entropy, value_head)
    T = batch.completion_ids.shape[1]
    logits, h = model_forward(model, batch, T, hidden=value_head is not None, **extra)
    keep = batch.keep_mask if keep_sampling_mask else None
    logp, ent = token_logp(logits, batch.completion_ids, temperature, keep, with_entropy)
    values = value_head(h).squeeze(-1).float() if value_head is not None else None
    mask = batch.mask > 0
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    return logp, ent, values
