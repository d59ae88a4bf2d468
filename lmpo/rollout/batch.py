"""``RolloutBatch``: the one carrier between the stages of an RL step.

Rows are ordered group by group: rows ``i*G … i*G+G-1`` are the G samples of prompt i.
The rollout fills the sampling fields; ``reward``, ``prepare`` and ``update`` add theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from ..data import DatasetError


@dataclass
class RolloutBatch:
    # --- from the rollout
    prompt_ids: torch.Tensor          # [N, P] left-padded
    prompt_mask: torch.Tensor         # [N, P]
    completion_ids: torch.Tensor      # [N, T] right-padded with pad after EOS
    mask: torch.Tensor                # [N, T] float, 1 on real completion tokens (EOS included)
    sampler_logp: torch.Tensor        # [N, T] log-prob of each sampled token under the sampling distribution
    truncated: torch.Tensor           # [N] bool: no EOS within max_new_tokens
    group_size: int
    prompts: list = field(default_factory=list)        # [N] prompt text
    completions: list = field(default_factory=list)    # [N] completion text (without EOS)
    rows: list = field(default_factory=list)           # [N] the dataset row of each sample
    keep_mask: torch.Tensor | None = None   # [N, T, V] bool: kept top-p/top-k support (keep_sampling_mask)
    routing: list | None = None             # per MoE layer [N, P+T, k] expert ids (keep_routing)
    policy_version: torch.Tensor | None = None  # [N] long: optimizer steps of the weights that sampled the row
    seq_mask: torch.Tensor | None = None    # [N, T] multi-turn: 1 on every real token (environment's too); None = mask
    turn_rewards: torch.Tensor | None = None  # [N, T] multi-turn: each turn's reward on its last model token
    # --- from reward
    rewards: torch.Tensor | None = None     # [N] sequence reward (NaN where invalid)
    valid: torch.Tensor | None = None       # [N] bool: every reward source scored this sample
    step_rewards: torch.Tensor | None = None  # [N, S] process rewards, NaN-padded
    step_ends: torch.Tensor | None = None     # [N, S] token index where each step ends, -1-padded
    reward_details: list = field(default_factory=list)  # [N] {"rewards": per source, "extra": log_extra}
    # --- from prepare
    old_logp: torch.Tensor | None = None    # [N, T]
    ref_logp: torch.Tensor | None = None    # [N, T]
    values: torch.Tensor | None = None      # [N, T]
    values_live: torch.Tensor | None = None  # [N, T] the same values with the critic's graph (one update per rollout)
    token_rewards: torch.Tensor | None = None  # [N, T]
    adv: torch.Tensor | None = None         # [N, T]
    returns: torch.Tensor | None = None     # [N, T]

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "RolloutBatch":
        """The rows ``idx`` (a 1-D index tensor) of every per-row field."""
        n = len(self)
        ids = idx.tolist()
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n:
                out[f.name] = v[idx]
            elif isinstance(v, list) and len(v) == n and f.name != "routing":
                out[f.name] = [v[i] for i in ids]
            elif f.name == "routing" and v is not None:
                out[f.name] = [r[idx] for r in v]
            else:
                out[f.name] = v
        return RolloutBatch(**out)

    def to(self, device) -> "RolloutBatch":
        """The same batch with every tensor on ``device``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v.to(device)
            elif f.name == "routing" and v is not None:
                v = [r.to(device) for r in v]
            out[f.name] = v
        return RolloutBatch(**out)

    @staticmethod
    def cat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Concatenate batches row-wise (right-padding the token dimension)."""
        if len(batches) == 1:
            return batches[0]
        out = {}
        for f in fields(RolloutBatch):
            vals = [getattr(b, f.name) for b in batches]
            if all(v is None for v in vals):
                out[f.name] = None
            elif isinstance(vals[0], torch.Tensor):
                out[f.name] = cat_padded(vals, f.name)
            elif isinstance(vals[0], list) and f.name != "routing":
                out[f.name] = [x for v in vals for x in v]
            elif f.name == "routing":
                out[f.name] = _cat_routing(batches)
            else:
                out[f.name] = vals[0]
        return RolloutBatch(**out)


def _cat_routing(batches):
    """Routing tables [n, P+T, k] per layer, aligned like the tokens: prompt columns left-padded and
    completion columns right-padded with -1 (no token)."""
    P = max(b.prompt_ids.shape[1] for b in batches)
    T = max(b.completion_ids.shape[1] for b in batches)
    layers = []
    for tables in zip(*[b.routing for b in batches]):
        padded = []
        for b, tab in zip(batches, tables):
            p, t = b.prompt_ids.shape[1], b.completion_ids.shape[1]
            left = tab.new_full((tab.shape[0], P - p, tab.shape[2]), -1)
            right = tab.new_full((tab.shape[0], T - t, tab.shape[2]), -1)
            padded.append(torch.cat([left, tab[:, :p + t], right], 1))
        layers.append(torch.cat(padded))
    return layers


_PAD = {"step_ends": -1, "step_rewards": float("nan")}  # right-padding values other than 0


def cat_padded(vals, name):
    """Concatenate ``vals`` ([n_i, ...]) along rows, padding dim 1 to the widest: prompts on the left,
    other fields on the right with ``_PAD``'s value for ``name`` (0 by default)."""
    if vals[0].dim() == 1:
        return torch.cat(vals)
    width = max(v.shape[1] for v in vals)
    out = []
    for v in vals:
        extra = width - v.shape[1]
        if extra:
            fill = _PAD.get(name, 0)
            if name in ("prompt_ids", "prompt_mask"):  # prompts are left-padded (masked, so any id does)
                v = torch.cat([torch.zeros((v.shape[0], extra, *v.shape[2:]), dtype=v.dtype, device=v.device), v], 1)
            else:
                pad = torch.full((v.shape[0], extra, *v.shape[2:]), fill, dtype=v.dtype, device=v.device)
                v = torch.cat([v, pad], 1)
        out.append(v)
    return torch.cat(out)


def encode_prompts(tokenizer, prompts: list[str], max_prompt_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_ids, prompt_mask), both [B, P] and left-padded, as the built-in ``rollout`` and the
    vLLM engine tokenize: special tokens added, unless the prompts already start with the BOS
    token (a chat template that writes it itself: no second BOS); DatasetError naming the first
    prompt longer than ``max_prompt_len`` tokens."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = not (bos and any(p.startswith(bos) for p in prompts))
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if max_prompt_len is not None and ids.shape[1] > max_prompt_len:
        lengths = mask.sum(-1)
        bad = int((lengths > max_prompt_len).nonzero()[0, 0])
        raise DatasetError(f"prompt {bad} of this batch is {int(lengths[bad])} tokens, longer than max_prompt_len={max_prompt_len} "
                           f"(the model's context minus max_new_tokens): {prompts[bad][:80]!r}")
    return ids, mask
