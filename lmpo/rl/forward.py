"""Training-side forward passes over a ``RolloutBatch``: completion log-probs, entropy, values.

Log-probs are computed for completion tokens only: the model returns logits for the last T+1
positions (``logits_to_keep``), and log π(a_t) = logit[a_t] − logsumexp(logits), in row chunks so
no float32 ``[N, T, vocab]`` copy of the whole batch is made at once. The G samples of a group
share their prompt, so it is computed once per group (with a KV cache that the completions attend
to, gradients flowing through it), not G times.
"""

from __future__ import annotations

import torch

from lmpo.algorithms import sampling_support_logp
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


def completion_logp(model, batch, temperature: float, keep_sampling_mask: bool = False, with_entropy: bool = False,
                    value_head=None, **extra):
    """(logp [N, T], entropy [N, T] | None, values [N, T] | None) of the batch's completions under ``model``.

    ``value_head``: a scalar head on the policy's last hidden states (``critic: shared``)."""
    T = batch.completion_ids.shape[1]
    logits, h = model_forward(model, batch, T, hidden=value_head is not None, **extra)
    keep = batch.keep_mask if keep_sampling_mask else None
    logp, ent = token_logp(logits, batch.completion_ids, temperature, keep, with_entropy)
    values = value_head(h).squeeze(-1).float() if value_head is not None else None
    mask = batch.mask > 0
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    return logp, ent, values
