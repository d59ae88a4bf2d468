"""Format, length and exact-match rewards (pure Python, no dependencies)."""

from __future__ import annotations

import re

from .text import as_text as _text

_THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)


def think_answer_format(prompts, completions, **_columns):
    """1.0 when the completion is exactly ``<think>…</think><answer>…</answer>`` (whitespace
    around and between allowed, both parts non-empty, each tag exactly once), else 0.0."""
    out = []
    for c in completions:
        text = _text(c)
        m = _THINK_ANSWER.fullmatch(text)
        ok = (m is not None and m.group(1).strip() and m.group(2).strip()
              and all(text.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")))
        out.append(1.0 if ok else 0.0)
    return out


def make_length_penalty(max_len: int = 1024, soft_len: int | None = None, unit: str = "auto"):
    """A length penalty: 0 up to ``soft_len``, falling linearly to -1 at ``max_len``, -1 beyond.

    Length is counted in tokens when the caller passes ``completion_ids`` (TRL does) and
    ``unit`` is "auto" or "tokens"; otherwise in characters. ``soft_len`` defaults to 3/4 of
    ``max_len`` (the soft overlong punishment of DAPO, with a linear ramp).
    """
    soft = int(0.75 * max_len) if soft_len is None else soft_len
    if not 0 <= soft < max_len:
        raise ValueError("length_penalty needs 0 <= soft_len < max_len, got %s, %s" % (soft, max_len))

    def length_penalty(prompts, completions, completion_ids=None, **_columns):
        if completion_ids is not None and unit in ("auto", "tokens"):
            lengths = [len(ids) for ids in completion_ids]
        else:
            lengths = [len(_text(c)) for c in completions]
        return [0.0 if n <= soft else max(-1.0, -(n - soft) / (max_len - soft)) for n in lengths]

    length_penalty.__name__ = "length_penalty"
    length_penalty.__doc__ = ("0 up to %d, linearly down to -1 at %d (%s), -1 beyond."
                              % (soft, max_len, unit))
    return length_penalty


length_penalty = make_length_penalty()


def addition_exact(prompts, completions, answer=None, **_columns):
    """The embedded task ("37+48=" -> "85"): exact match, 1.0 when the completion (stripped of
    surrounding whitespace) equals the ``answer`` string, else 0.0. Trailing text is wrong.
    None for a row whose answer is None; an error without an ``answer`` column."""
    if answer is None:
        raise KeyError("addition_exact needs an 'answer' column (the gold sum); the dataset has none")
    out = []
    for c, gold in zip(completions, answer):
        out.append(None if gold is None else 1.0 if _text(c).strip() == str(gold).strip() else 0.0)
    return out
