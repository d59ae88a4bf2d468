"""A trained reward model as a reward function.

``RewardModelScorer(path)`` loads an ``AutoModelForSequenceClassification`` (one output; e.g. from
``lmpo rm``) and is called like any reward function (TRL's keywords; positional
``(prompts, completions)`` works too) -> ``list[float]``: the score of ``prompt + completion`` read
at its last real token, computed in batches without gradients. A chat prompt is rendered with the
reward model's own chat template.
"""

from __future__ import annotations

import torch

from lmpo.data.datasets import render_prompt
from lmpo.models.value import load_scalar_model, sequence_scores


def _completion_text(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # TRL's conversational completions: [{"role": "assistant", "content": ...}]
        return "".join(str(m.get("content", "")) for m in c if isinstance(m, dict))
    raise TypeError(f"a completion must be text or a list of messages, got {type(c).__name__}.")


class RewardModelScorer:
    """Scores completions with the reward model in ``path``.

    ``batch_size`` texts per forward (sorted by length so a batch pads little); ``device``
    defaults to CUDA when available; ``max_length`` truncates from the left (the end of the
    completion is what is scored; default: the tokenizer's limit)."""

    name = "reward_model"
    __name__ = "reward_model"

    def __init__(self, path, batch_size: int = 64, device=None, max_length: int | None = None, dtype=None):
        from transformers import AutoTokenizer

        self.path = str(path)
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        limit = self.tokenizer.model_max_length
        self.max_length = max_length or (limit if limit < 1e6 else None)
        self.reload()

    def reload(self):
        """Read the weights again from ``path`` (after iterative GRPO retrained the model there)."""
        self.model = load_scalar_model(self.path, self.tokenizer, require_head=True, dtype=self.dtype)
        self.model.to(self.device).eval()
        return self

    @torch.no_grad()
    def __call__(self, prompts, completions, **columns) -> list[float]:
        texts = [render_prompt(p, self.tokenizer, i) + _completion_text(c)
                 for i, (p, c) in enumerate(zip(prompts, completions, strict=True))]
        return self.score_texts(texts)

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        """Scores of whole texts (prompt and completion already joined)."""
        tok = self.tokenizer
        lengths = [len(ids) for ids in tok(texts, truncation=self.max_length is not None,
                                           max_length=self.max_length)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        scores = [0.0] * len(texts)
        side = tok.truncation_side
        tok.truncation_side = "left"
        try:
            for s in range(0, len(order), self.batch_size):
                idx = order[s:s + self.batch_size]
                enc = tok([texts[i] for i in idx], padding=True, truncation=self.max_length is not None,
                          max_length=self.max_length, return_tensors="pt").to(self.device)
                r = sequence_scores(self.model, enc["input_ids"], enc["attention_mask"])   # [b]
                for i, v in zip(idx, r.tolist()):
                    scores[i] = v
        finally:
            tok.truncation_side = side
        return scores

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.path!r}, batch_size={self.batch_size}, device='{self.device}')"
