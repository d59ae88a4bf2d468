"""Private helpers shared by the algorithm modules (masking, per-sequence reductions)."""

from __future__ import annotations

import torch
from torch import Tensor


def as_bool(mask: Tensor) -> Tensor:
    """A float or bool mask as bool (nonzero = real token)."""
    return mask if mask.dtype == torch.bool else mask != 0


def clean(x: Tensor, m: Tensor, fill: float = 0.0) -> Tensor:
    """Replace masked positions by `fill` with torch.where, so NaN/inf garbage never leaks
    into a value or a gradient (multiplication by 0 would turn inf into NaN)."""
    return torch.where(m, x, torch.full_like(x, fill))


def row_counts(m: Tensor, dtype: torch.dtype) -> Tensor:
    """Number of real tokens per row, as `dtype`.  # [N]"""
    return m.sum(-1).to(dtype)


def row_mean(x: Tensor, m: Tensor) -> Tensor:
    """Mean over the real tokens of each row; 0 for a row without real tokens.  # [N]"""
    n = row_counts(m, x.dtype)
    return clean(x, m).sum(-1) / n.clamp(min=1)


def per_sequence(adv: Tensor, m: Tensor) -> Tensor:
    """Advantages [N] as they are, or [N, T] reduced to the mean over each row's real tokens."""
    if adv.dim() == 1:
        return adv
    return row_mean(adv, m)


def per_token(adv: Tensor, m: Tensor) -> Tensor:
    """Advantages [N] broadcast to [N, T], or [N, T] as they are; zero at masked positions."""
    if adv.dim() == 1:
        adv = adv[:, None].expand(m.shape)
    return clean(adv, m)


def last_token_index(m: Tensor) -> Tensor:
    """Index of the last real token of each row, -1 for a row without real tokens.  # [N]"""
    t = torch.arange(m.shape[-1], device=m.device).expand(m.shape)
    return torch.where(m, t, torch.full_like(t, -1)).max(-1).values


def place_on_last_token(values: Tensor, m: Tensor) -> Tensor:
    """A [N] tensor placed on each row's last real token of a zero [N, T] tensor; a row with
    no real tokens gets nothing."""
    last = last_token_index(m)  # [N]
    t = torch.arange(m.shape[-1], device=m.device)
    hit = (t[None, :] == last[:, None]) & m  # [N, T]
    v = values if values.is_floating_point() else values.float()
    return torch.where(hit, v[:, None], torch.zeros((), dtype=v.dtype, device=v.device))


def check_groups(n: int, group_size: int) -> int:
    """Number of groups; raises when N is not a multiple of group_size."""
    if group_size < 1 or n % group_size != 0:
        raise ValueError(f"N={n} rows is not a positive multiple of group_size={group_size}")
    return n // group_size
