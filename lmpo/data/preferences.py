"""Preference pairs for reward-model training: a prompt, a chosen and a rejected response, and an
optional margin (how much better chosen is; 0 when absent).

Files are anything ``load_rows`` reads (jsonl, json, parquet, csv, a saved HF dataset) with the
columns ``prompt``, ``chosen``, ``rejected`` (and optionally ``margin``). ``prompt`` may be text or
chat messages; ``chosen``/``rejected`` may be text or a one-message list ``[{"role": "assistant",
"content": ...}]``. The built-in ``addition`` task makes its own pairs: the correct sum against a
plausible wrong one.
"""

from __future__ import annotations

import math
import random

from .datasets import DatasetError, load_rows
from .tasks import ADDITION, addition_heldout, addition_rows

COLUMNS = ("prompt", "chosen", "rejected")
ADDITION_PAIRS = 20000


def load_preferences(source, *, what: str = "preference dataset", split: str = "train") -> list[dict]:
    """Rows ``{"prompt", "chosen", "rejected", "margin"}`` from ``source`` (a path, a list of
    dicts, or ``'addition'``). Missing columns and unusable values are ``DatasetError``s that
    name the file and the row."""
    if source == ADDITION:
        return addition_preferences(ADDITION_PAIRS, seed=0)
    rows = load_rows(source, required=COLUMNS, split=split, what=what)
    name = "<rows>" if isinstance(source, list) else str(source)
    out = []
    for i, r in enumerate(rows):
        prompt = r["prompt"]
        if not isinstance(prompt, (str, list)):
            raise DatasetError(f"{what} '{name}' row {i}: 'prompt' must be text or chat messages, "
                               f"got {type(prompt).__name__}.")
        pair = {"prompt": prompt,
                "chosen": _response(r["chosen"], "chosen", what, name, i),
                "rejected": _response(r["rejected"], "rejected", what, name, i),
                "margin": _margin(r.get("margin"), what, name, i)}
        out.append(pair)
    return out


def _response(value, col: str, what: str, name: str, i: int) -> str:
    if isinstance(value, str):
        return value
    if (isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value)
            and all(m.get("role", "assistant") == "assistant" for m in value)):
        return "".join(str(m["content"]) for m in value)
    raise DatasetError(f"{what} '{name}' row {i}: '{col}' must be the response text (or assistant messages "
                       f"[{{'role': 'assistant', 'content': ...}}]), got {type(value).__name__} {str(value)[:60]!r}. "
                       "If chosen/rejected hold the whole conversation, split the shared prompt into a 'prompt' column.")


def _margin(value, what: str, name: str, i: int) -> float:
    if value is None:
        return 0.0
    try:
        m = float(value)
    except (TypeError, ValueError):
        m = math.nan
    if isinstance(value, bool) or not math.isfinite(m):
        raise DatasetError(f"{what} '{name}' row {i}: 'margin' must be a finite number, got {value!r}.")
    return m


# ----------------------------------------------------------------------------- the addition task


WRONG_KINDS = ("plus_one", "minus_one", "plus_ten", "minus_ten", "digit_swap", "random")


def wrong_sum(correct: int, rng: random.Random, kind: str | None = None) -> int:
    """A plausible wrong answer to a 2-digit addition: off by ±1 or ±10, the digits swapped, or a
    random sum in the task's range (20 … 198); never equal to ``correct`` and never negative."""
    kind = kind or rng.choice(WRONG_KINDS)
    if kind == "digit_swap":
        s = str(correct)
        swapped = int(s[::-1]) if len(s) == 2 else int(s[0] + s[2] + s[1])
        if swapped != correct and not (len(s) == 2 and s[1] == "0"):
            return swapped
        kind = "random"
    offsets = {"plus_one": 1, "minus_one": -1, "plus_ten": 10, "minus_ten": -10}
    if kind in offsets:
        return correct + offsets[kind]
    while True:
        w = rng.randint(20, 198)
        if w != correct:
            return w


def addition_preferences(n: int, seed: int, heldout: bool = False) -> list[dict]:
    """``n`` pairs for the embedded task: chosen is the correct sum, rejected a plausible wrong one
    (see ``wrong_sum``), so a reward model has to check the arithmetic to rank them.

    Training pairs use the training prompts of ``addition_rows``; ``heldout=True`` cycles the
    fixed held-out prompts of ``addition_heldout`` (never trained on) instead."""
    rng = random.Random(seed)
    if heldout:
        base = addition_heldout()
        rows = [base[i % len(base)] for i in range(n)]
    else:
        rows = addition_rows(n, seed=seed)
    out = []
    for r in rows:
        correct = int(r["answer"])
        out.append({"prompt": r["prompt"], "chosen": str(correct),
                    "rejected": str(wrong_sum(correct, rng)), "margin": 0.0})
    return out
