"""Scalar heads on a transformer: the PPO critic and the reward model's scorer.

Both are an ``AutoModelForSequenceClassification`` with ``num_labels=1``: the backbone
(``getattr(model, model.base_model_prefix)``) plus a linear head (``model.score``, or
``model.classifier`` for architectures that call it that). The critic reads the head at every
completion position; the reward model reads it at the last real token. We run the backbone
ourselves and apply the head only where it is needed, so padding side and ``pad_token_id``
never decide which token is read.

``critic: shared`` does without the second model: a ``ValueHead`` on the policy's own hidden states.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


# ----------------------------------------------------------------------------- loading


def _is_seq_cls_dir(path) -> bool:
    from transformers import AutoConfig

    archs = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_scalar_model(path, tokenizer=None, *, require_head: bool = False, dtype=None):
    """An ``AutoModelForSequenceClassification`` with one output from ``path``.

    ``path`` is a causal-LM directory (its LM head is dropped and a new scalar head is made) or
    a sequence-classification directory (its head is kept). ``require_head=True`` makes a
    causal-LM directory an error (a trained head is needed). ``config.pad_token_id`` is set from the
    tokenizer (or the EOS token) so that plain ``model(**batch)`` also works on padded batches.
    """
    from transformers import AutoModelForSequenceClassification

    is_rm = _is_seq_cls_dir(path)
    if require_head and not is_rm:
        raise ValueError(f"'{path}' holds no sequence-classification head (its architecture is a causal LM); "
                         "train a reward model with `lmpo rm` or load it as a policy instead.")
    kw = {"dtype": dtype} if dtype is not None else {}
    with _quiet():  # a causal-LM directory has no head to load: that is the point, not a warning
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kw)
    if model.config.num_labels != 1:
        raise ValueError(f"'{path}' has a head with {model.config.num_labels} outputs; a scalar model needs 1.")
    _set_pad(model, tokenizer)
    return model


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _set_pad(model, tokenizer=None):
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = model.config.pad_token_id
    if pad is None:
        eos = model.config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    model.config.pad_token_id = pad


def load_value_model(path, tokenizer=None, from_reward_model: bool = False, dtype=None):
    """The PPO critic: a scalar-head model loaded from ``path``.

    From a causal-LM (policy) directory the head is new and zero, so every initial value is 0
    and the first advantages are the plain returns. With ``from_reward_model=True`` ``path`` must
    be a reward-model directory and its trained head is kept (the critic starts as the RM)."""
    model = load_scalar_model(path, tokenizer, require_head=from_reward_model, dtype=dtype)
    if not from_reward_model:
        with torch.no_grad():
            head = scalar_head(model)
            head.weight.zero_()
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
    return model


# ----------------------------------------------------------------------------- reading the head


def backbone(model) -> nn.Module:
    """The transformer under the head (``model.model`` for Llama/Qwen, ``model.transformer`` for GPT-2)."""
    return getattr(model, model.base_model_prefix)


def scalar_head(model) -> nn.Module:
    """The scalar output layer: ``model.score`` or, failing that, ``model.classifier``."""
    head = getattr(model, "score", None)
    if head is None:
        head = getattr(model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has neither a 'score' nor a 'classifier' head.")
    return head


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so left padding never shifts them. [N, L]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _hidden(model, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    if position_ids is None:
        position_ids = positions(attention_mask)
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
    return out.last_hidden_state                                                  # [N, L, H]


def _apply_head(head, h: torch.Tensor) -> torch.Tensor:
    return head(h.to(head.weight.dtype)).squeeze(-1).float()


def token_values(model, input_ids, attention_mask, position_ids, T: int) -> torch.Tensor:
    """Values of the states before each of the T completion tokens. [N, T] float32

    ``input_ids`` is prompt + completion, [N, P+T] (prompt left-padded, completion last). The
    hidden state at position -T-1+t has seen the prompt and completion tokens < t, so
    ``V[:, t]`` is the value of the state in which completion token t is chosen. The backbone
    runs once; the head is applied to those T positions only."""
    h = _hidden(model, input_ids, attention_mask, position_ids)                  # [N, P+T, H]
    return _apply_head(scalar_head(model), h[:, -T - 1:-1])                      # [N, T]


def sequence_scores(model, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """The head at each row's last real token (the reward model's score). [N] float32

    The last real token is the rightmost position with ``attention_mask == 1``, which is right
    for left and right padding and for tokenizers whose pad token is also their EOS."""
    h = _hidden(model, input_ids, attention_mask, position_ids)                  # [N, L, H]
    L = attention_mask.shape[-1]
    idx = torch.arange(L, device=attention_mask.device)
    last = (idx * attention_mask.long()).argmax(-1)                              # [N]
    h_last = h[torch.arange(h.shape[0], device=h.device), last]                  # [N, H]
    return _apply_head(scalar_head(model), h_last)                               # [N]


# ----------------------------------------------------------------------------- critic: shared


class ValueHead(nn.Module):
    """A scalar head on the policy's last hidden states (``critic: shared``); starts at zero."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1).float()


# ----------------------------------------------------------------------------- memory


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def param_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Bytes held for training ``model``: parameters, gradients (those allocated now, and those of the
    parameters ``optimizer`` has stepped: the loop frees them after each optimizer step and the next
    backward allocates them again) and the optimizer's state (e.g. AdamW's two moments); ``total`` is
    their sum. Activations are not counted. Parameters shared between modules (tied embeddings) are
    counted once."""
    params = list({id(p): p for p in model.parameters()}.values())
    stepped = optimizer.state if optimizer is not None else {}
    out = {
        "params": sum(_tensor_bytes(p) for p in params),
        "trainable_params": sum(_tensor_bytes(p) for p in params if p.requires_grad),
        "grads": sum(_tensor_bytes(p.grad) if p.grad is not None else _tensor_bytes(p) * (p in stepped)
                     for p in params),
        "optimizer": 0,
    }
    if optimizer is not None:
        out["optimizer"] = sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values())
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out
