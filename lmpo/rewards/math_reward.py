"""Math answer verifier: extract the final answer, compare it with the gold answer by value.

Comparison, in order (the first that decides wins):
1. the same text after light normalization (``$``, spaces, ``\\left``/``\\right``, a final
   period, thousands commas);
2. both sides plain numbers (integers, decimals, ``a/b``, ``\\frac{a}{b}``, with ``$``, ``%``
   or thousands commas): exact rational equality, so 0.5 = 1/2 but 0.33 != 1/3;
3. math-verify (LaTeX and expressions, parsed to sympy, compared symbolically/numerically);
4. sympy's own parser on plain-text expressions, ``simplify(a - b) == 0``.

math-verify and sympy are imported on first use, so ``import lmpo.rewards`` stays light.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction

MAX_ANSWER_CHARS = 300

_LAST_NUMBER = re.compile(r"(?<![\w.])(-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+)")
_ANSWER_IS = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*(.+?)\s*(?:\.(?:\s|$)|\n|$)",
    re.IGNORECASE)
_HASHES = re.compile(r"####\s*(.+?)\s*(?:\n|$)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _last_braced(text: str, commands=("\\boxed", "\\fbox")) -> str | None:
    """Contents of the last ``\\boxed{...}`` (braces balanced), or of ``\\boxed 5``."""
    start, cmd = max((text.rfind(c), c) for c in commands)
    if start == -1:
        return None
    i = start + len(cmd)
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
        return text[i + 1:]  # unbalanced (truncated): take the rest
    m = re.match(r"([^\s$]+)", text[i:])
    return m.group(1) if m else None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion, or None.

    Tried in order: ``<answer>...</answer>`` (then searched again inside), the last
    ``\\boxed{...}``, GSM8K's ``#### 42``, "the answer is ...", and finally the last number.
    """
    if not isinstance(text, str):
        return None
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = tags[-1].strip()
        return extract_answer_strict(inner) or inner or None
    return extract_answer_strict(text) or _last_number(text)


def extract_answer_strict(text: str) -> str | None:
    """Like :func:`extract_answer` but only from explicit markers (no last-number guess)."""
    boxed = _last_braced(text)
    if boxed is not None:
        return boxed.strip()
    m = _HASHES.findall(text)
    if m:
        return m[-1].strip()
    m = _ANSWER_IS.findall(text)
    if m:
        ans = m[-1].strip()
        inner = _last_braced(ans)
        return inner.strip() if inner is not None else ans
    return None


def _last_number(text: str) -> str | None:
    m = _LAST_NUMBER.findall(text)
    return m[-1].strip() if m else None


def gold_answer(gold) -> str | None:
    """The gold answer from a dataset cell: GSM8K's ``... #### 72``, a boxed answer, or as is."""
    if gold is None:
        return None
    if isinstance(gold, (int, float, Fraction)):
        return str(gold)
    gold = str(gold)
    if "####" in gold:
        return gold.rsplit("####", 1)[1].strip()
    boxed = _last_braced(gold)
    return boxed.strip() if boxed is not None else gold.strip()


def _normalize(s: str) -> str:
    s = s.strip()
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\displaystyle", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("dfrac", "frac").replace("tfrac", "frac")
    s = re.sub(r"\\text\{\s*\}", "", s)
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    return re.sub(r"\s+", "", s)


def to_number(s: str) -> Fraction | None:
    """A plain number as an exact Fraction (``-1,234.5``, ``3/4``, ``\\frac{3}{4}``, ``12%``,
    ``$5``, ``5 dollars``), or None when the text is not just a number."""
    t = _normalize(s)
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t)
    t = re.sub(r"(?:\\%|%|\\text\{[a-zA-Z ]*\}|dollars?|cents?|units?)$", "", t)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", t) or re.fullmatch(r"(-?)\\frac(\d)(\d)", t)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if den == 0:
            return None
        return Fraction(-num if m.group(1) else num, den)
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?|-?\.\d+)(?:/(-?\d+(?:\.\d+)?))?", t)
    if not m:
        return None
    try:
        value = Fraction(m.group(1))
        if m.group(2) is not None:
            den = Fraction(m.group(2))
            if den == 0:
                return None
            value /= den
        return value
    except (ValueError, ZeroDivisionError):
        return None


_mv = None
_mv_lock = threading.Lock()


def _math_verify():
    global _mv
    with _mv_lock:
        if _mv is None:
            import math_verify

            for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
            _mv = math_verify
        return _mv


def _mv_equal(gold: str, pred: str) -> bool:
    mv = _math_verify()
    # math-verify's timeouts use SIGALRM, which only works in the main thread.
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    for g, p in (("$%s$" % gold, "$%s$" % pred), (gold, pred)):
        try:
            pg = mv.parse(g, parsing_timeout=timeout)
            pp = mv.parse(p, parsing_timeout=timeout)
            if pg and pp and mv.verify(pg, pp, timeout_seconds=timeout):
                return True
        except Exception:  # noqa: BLE001 - an unparseable answer is just not a match
            continue
    return False


def _sympy_equal(gold: str, pred: str) -> bool:
    if not re.fullmatch(r"[\w\s+\-*/^().]+", gold + pred) or "**" in gold + pred:
        return False
    try:
        from sympy import simplify
        from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application,
                                                parse_expr, standard_transformations)

        tr = standard_transformations + (implicit_multiplication_application, convert_xor)
        a = parse_expr(gold, transformations=tr, evaluate=True)
        b = parse_expr(pred, transformations=tr, evaluate=True)
        return bool(simplify(a - b) == 0)
    except Exception:  # noqa: BLE001
        return False


def answers_match(gold, pred) -> bool:
    """True when the predicted answer has the same value as the gold answer."""
    if gold is None or pred is None:
        return False
    gold, pred = str(gold), str(pred)
    if len(pred) > MAX_ANSWER_CHARS or not pred.strip():
        return False
    if _normalize(gold) == _normalize(pred):
        return True
    ng, np_ = to_number(gold), to_number(pred)
    if ng is not None and np_ is not None:
        return ng == np_
    if ng is not None and np_ is None and not re.search(r"[\\a-zA-Z^(]", pred):
        return False  # e.g. gold 12, prediction "12 13": junk, not an expression
    return _mv_equal(gold, pred) or _sympy_equal(gold, pred)


def math_answer(prompts, completions, answer=None, **_columns):
    """1.0 when the completion's final answer equals the row's ``answer`` by value, else 0.0.

    Rows without an answer (None) give None: not applicable.
    """
    if answer is None:
        return [None] * len(completions)
    out = []
    for completion, gold in zip(completions, answer):
        g = gold_answer(gold)
        if g is None or g == "":
            out.append(None)
            continue
        out.append(1.0 if answers_match(g, extract_answer(_text(completion))) else 0.0)
    return out


def _text(completion) -> str:
    """Completions may be plain strings or chat messages ([{"role", "content"}, ...])."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return str(completion)
