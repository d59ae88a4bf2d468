"""The built-in sampler: batched KV-cache generation for any HF causal LM.

All groups are generated in one batch. A group shares its prompt, so the prompt is prefilled once
and its cache expanded to the G samples; sequences that emit a stop token (EOS, or the chat
template's end-of-turn token) leave the batch and stop costing compute. Each sampled token's
log-prob under the sampling distribution is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.load import cache_kw, output_cache
from .batch import RolloutBatch, encode_prompts
from lmpo.models.moe import RoutingRecorder, is_moe
from lmpo.rollout import lean_decode


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits [n, V] with everything outside the top-k / top-p (nucleus) support set to -inf.

    top-p keeps the smallest set of most probable tokens whose mass reaches ``top_p`` (the token
    that crosses the threshold is kept)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs          # mass of strictly more probable tokens
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: token i with F(i−1) < u·F(V) ≤ F(i), F the cumulative softmax of
    ``logits`` [n, V] and ``u`` [n] uniforms in (0, 1). Each row depends only on its own uniform, so a
    sample does not depend on which other rows share the batch (or the rank that draws it)."""
    cdf = logits.softmax(-1).cumsum(-1)                                                  # [n, V]
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=logits.shape[-1] - 1)


def group_uniforms(seeds: list[int], group_size: int, steps: int, device=None) -> torch.Tensor:
    """[B·G, T] uniforms in (0, 1), one seeded stream per prompt: a group's samples are a function of
    its seed alone."""
    out = [torch.rand(group_size, steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(out).clamp_(min=1e-12).to(device)


def end_of_turn_id(tokenizer) -> int | None:
    """The chat template's end-of-turn token: the special token the template writes right after an
    assistant message's content (``<|im_end|>`` for ChatML templates, ``<|eot_id|>`` for Llama 3), or None
    without a template or when what follows the content is not a single special token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "\u2063lmpo\u2063"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects this conversation has no usable answer here
        return None
    if not isinstance(text, str) or mark not in text:
        return None
    after = text.split(mark, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    return ids[0] if ids and ids[0] in special else None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, the chat template's end-of-turn token and the
    model's ``generation_config.eos_token_id`` (an int or a list), EOS first, without repeats."""
    ids = [tokenizer.eos_token_id, end_of_turn_id(tokenizer)]
    gen = getattr(model, "generation_config", None) if model is not None else None
    extra = getattr(gen, "eos_token_id", None)
    ids += list(extra) if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _forward(model, **kw):
    try:
        return model(**kw, logits_to_keep=1)
    except TypeError:  # models without logits_to_keep
        return model(**kw)


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: the same fields whichever engine does it."""

    group_size: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    keep_support: bool = False       # DeepSeek-V3.2 keep sampling mask: record the top-p/top-k support
    keep_routing: bool = False       # DeepSeek-V3.2 keep routing: record MoE experts per token
    max_prompt_len: int | None = None
    dtype: str = "float32"


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, spec: SamplingSpec, *, eos_token_id: int | list[int], pad_token_id: int,
             uniforms: torch.Tensor | None = None, routing=None):
    """Sample ``spec.group_size`` completions for each of the B prompts.

    prompt_ids, prompt_mask: [B, P] left-padded. Returns a dict of tensors on the model's device:
    ``completion_ids`` [N, T], ``mask`` [N, T] (real tokens, EOS included), ``sampler_logp`` [N, T],
    ``truncated`` [N], and ``keep_mask`` [N, T, V] when ``spec.keep_support``; N = B·G, T ≤ max_new_tokens.
    ``sampler_logp`` is the log-prob under the distribution actually sampled from: with top-p /
    top-k the truncated, renormalised one (so it is >= the full-vocabulary log-prob the trainer
    computes unless ``keep_sampling_mask``). ``eos_token_id``: the stop token, or a list of them
    (``stop_token_ids``); a row ends at the first one it samples. ``temperature == 0`` is greedy
    decoding (log-probs then come from the untempered distribution).
    ``uniforms`` [N, max_new_tokens] drive the sampling (see ``sample_tokens``); by default they are
    drawn from torch's global generator. ``routing``: a ``lmpo.models.moe.RoutingRecorder`` active
    around this call, told when rows are expanded (after the prefill) and when finished rows leave.
    """
    device = prompt_ids.device
    stop = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=device)
    cache, logits, attn, next_pos = _prefill(model, prompt_ids, prompt_mask, spec.group_size, routing)
    N, V = logits.shape
    T = spec.max_new_tokens
    if spec.dtype == "bfloat16" and routing is None and lean_decode.supports(model):
        torch.clear_autocast_cache()            # the prefill's bf16 weight casts go before the decoder's own are made
        decoder = lean_decode.LeanDecoder(model, cache, attn, T)              # HF's cache copied, then dropped
    else:
        decoder = HFDecoder(model, cache, attn)
    del cache, attn
    tokens = torch.full((N, T), pad_token_id, dtype=torch.long, device=device)
    logps = torch.zeros(N, T, device=device)
    finished_at = torch.full((N,), T, dtype=torch.long, device=device)                   # length incl. EOS
    keep = torch.zeros(N, T, V, dtype=torch.bool, device=device) if spec.keep_support else None
    alive = torch.arange(N, device=device)                                               # rows still generating
    if uniforms is None and spec.temperature != 0:
        uniforms = torch.rand(N, T, device=device).clamp_(min=1e-12)
    for t in range(T):
        tok, dist_logits = _pick(logits, spec, None if uniforms is None else uniforms[alive, t])
        tokens[alive, t] = tok
        logps[alive, t] = dist_logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)  # top-p/top-k: renormalised
        if keep is not None:
            keep[alive, t] = torch.isfinite(dist_logits)
        done = torch.isin(tok, stop)
        finished_at[alive[done]] = t + 1
        if t == T - 1:
            break
        if done.any():
            stay = (~done).nonzero().squeeze(-1)
            if stay.numel() == 0:
                break
            decoder.select(stay)
            if routing is not None:
                routing.select(stay)
            alive, tok, next_pos = alive[stay], tok[stay], next_pos[stay]
        logits = decoder.step(tok, next_pos)
        next_pos = next_pos + 1
    return _result(tokens, logps, finished_at, keep, stop)


class HFDecoder:
    """Decoding steps through the model's own forward and HF's KV cache ``cache``, for the rows whose
    attention mask so far is ``attn`` [N, P]; the interface of ``lean_decode.LeanDecoder``: ``step`` gives
    the next logits [n, V] in float32, ``select`` keeps the rows that are still generating."""

    def __init__(self, model, cache, attn: torch.Tensor):
        self.model, self.cache, self.attn = model, cache, attn

    def select(self, rows: torch.Tensor):
        self.cache.batch_select_indices(rows)
        self.attn = self.attn[rows]

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.attn = torch.cat([self.attn, self.attn.new_ones(self.attn.shape[0], 1)], dim=1)
        out = _forward(self.model, input_ids=tok[:, None], attention_mask=self.attn, position_ids=pos[:, None],
                       **cache_kw(self.model, self.cache), use_cache=True)
        return out.logits[:, -1].float()


def _prefill(model, prompt_ids, prompt_mask, G: int, routing):
    """One forward over the B prompts with a cache, expanded to the N = B·G rows: (cache, the next
    token's logits [N, V] in float32, the attention mask [N, P], the next positions [N])."""
    pos = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)                              # [B, P]
    out = _forward(model, input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True)
    cache = output_cache(out)
    if G > 1:
        cache.batch_repeat_interleave(G)                                                 # one prefill per group
        if routing is not None:
            routing.expand(G)
    logits = out.logits[:, -1].float().repeat_interleave(G, 0)                           # [N, V]
    return cache, logits, prompt_mask.repeat_interleave(G, 0), pos[:, -1].repeat_interleave(G, 0) + 1


def _pick(logits, spec: SamplingSpec, u):
    """(the token of each row, the logits of the distribution it was sampled from): greedy at
    temperature 0, else inverse-CDF sampling with the rows' uniforms ``u`` from the tempered,
    top-k / top-p filtered distribution."""
    if spec.temperature == 0:
        return logits.argmax(-1), logits
    dist_logits = filter_logits(logits / spec.temperature, spec.top_k, spec.top_p)    # the distribution sampled from
    return sample_tokens(dist_logits, u), dist_logits


def _result(tokens, logps, finished_at, keep, stop) -> dict:
    N, device = tokens.shape[0], tokens.device
    width = int(finished_at.max())
    mask = (torch.arange(width, device=device)[None, :] < finished_at[:, None]).float()
    truncated = ~torch.isin(tokens[torch.arange(N, device=device), finished_at - 1], stop)
    result = {
        "completion_ids": tokens[:, :width],
        "mask": mask,
        "sampler_logp": logps[:, :width] * mask,
        "truncated": truncated,
    }
    if keep is not None:
        result["keep_mask"] = keep[:, :width]
    return result


def rollout(model, tokenizer, prompts: list[str], rows: list[dict], spec: SamplingSpec, *, seeds: list[int] | None = None,
            generator=None, device=None) -> RolloutBatch:
    """Tokenize ``prompts`` (left-padded to at most ``spec.max_prompt_len``), sample G completions each,
    and decode them. With ``seeds`` (one per prompt) each group's samples depend on its seed only;
    else the uniforms are drawn from ``generator``. With ``spec.keep_routing`` on an MoE model the
    experts chosen for every token are recorded (DeepSeek-V3.2 keep routing)."""
    from contextlib import nullcontext

    record = spec.keep_routing and is_moe(model)
    device = device or next(model.parameters()).device
    ids, pmask = encode_prompts(tokenizer, prompts, spec.max_prompt_len)
    ids, pmask = ids.to(device), pmask.to(device)
    G, T = spec.group_size, spec.max_new_tokens
    if seeds is not None:
        u = group_uniforms(seeds, G, T, device)
    elif spec.temperature != 0:
        u = torch.rand(len(prompts) * G, T, generator=generator, device=device).clamp_(min=1e-12)
    else:
        u = None
    with RoutingRecorder(model) if record else nullcontext() as rec:
        out = generate(model, ids, pmask, spec, eos_token_id=stop_token_ids(tokenizer, model),
                       pad_token_id=tokenizer.pad_token_id, uniforms=u, routing=rec)
    # each completion's own tokens only (pad may be a normal token, or the same id as EOS), special tokens dropped
    lengths = out["mask"].sum(-1).long().tolist()
    completions = tokenizer.batch_decode([row[:n] for row, n in zip(out["completion_ids"].tolist(), lengths)],
                                         skip_special_tokens=True)
    return RolloutBatch(
        prompt_ids=ids.repeat_interleave(G, 0), prompt_mask=pmask.repeat_interleave(G, 0),
        completion_ids=out["completion_ids"], mask=out["mask"], sampler_logp=out["sampler_logp"],
        truncated=out["truncated"], group_size=G,
        prompts=[p for p in prompts for _ in range(G)], completions=completions,
        rows=[r for r in rows for _ in range(G)], keep_mask=out.get("keep_mask"),
        routing=rec.routing(width=ids.shape[1] + out["completion_ids"].shape[1]) if record else None,
    )
