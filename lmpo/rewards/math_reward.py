"""Math answer verifier: math-verify's extraction and comparison, with guards where it misreads.

``math_answer`` gives 1.0 when the completion's final answer has the gold answer's value, else 0.0:

1. the completion's text (a string or TRL's chat messages, :func:`lmpo.rewards.text.as_text`); after
   a ``</think>``, only what follows it (when not blank); if it has ``<answer>…</answer>``, the last
   such part only;
2. a few notations that math-verify misreads are rewritten first (:func:`clean`): thousands
   separators made of spaces or thin spaces (``1\\,000``, ``$1 000$`` would read as 1·0), an upright
   Euler number or imaginary unit (``\\mathrm{e}``, ``\\mathrm{i}`` would be dropped as units, so
   ``2+3\\mathrm{i}`` read as 5), scientific notation (``1.5e3`` would read as 1.5, or 1.5·e·3 in LaTeX),
   an escaped dollar before a number (``\\$18`` would read as nothing);
3. extraction is math-verify's own on the whole text (``parse`` with ``LatexExtractionConfig`` with
   ``\\boxed`` first, and ``ExprExtractionConfig``): boxed answers, "final answer is", "answer:",
   LaTeX environments (``$…$``, ``\\(…\\)``, ``\\[…\\]``), then plain numbers and expressions. Several
   answers joined by "," / "and" / "or" (``\\boxed{1}, \\boxed{2}``) form one set. ``strict=True``
   reads only the boxed answer: the last ``\\boxed{}`` together with the boxes joined to it;
4. the gold cell: GSM8K's ``… #### 72`` keeps what follows ``####``; a gold with ``\\boxed`` or
   ``$`` is parsed like a completion (all its joined boxes kept); a bare plain number (``1,000``,
   ``2,5``, ``12%``) with math-verify's number reader; any other bare gold (``x+1``, ``\\frac{1}{2}``)
   as one LaTeX expression;
5. comparison is math-verify's ``verify`` (strict about variable names): exact for integers and
   rationals, symbolic for expressions, sets/intervals/tuples element-wise, equations by their sides;
   when either side is a float, both are rounded to ``precision`` decimal places first
   (round(a, p) = round(b, p)), so ``0.333333 = 1/3`` at p = 6 but ``0.33 ≠ 1/3``.

Timeouts. math-verify times out with SIGALRM, which works only in the main thread. In the main
thread the verifier runs in-process with those timeouts (``timeout_s`` per parse and per
comparison). Called from any other thread (the trainer's reward pool), each sample is sent to a
small pool of verifier processes (``python -c`` importing this module, no ``fork`` of the trainer);
a sample that takes longer than its deadline has its process killed and replaced, and scores 0.
A thread-based timeout cannot do this: sympy can sit in one long C call (``9^{9^{9}}``) holding
the GIL, which would stop the whole trainer.

math-verify and sympy are imported on first use, so ``import lmpo.rewards`` stays light.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from fractions import Fraction

from .text import as_text

log = logging.getLogger(__name__)

_text = as_text  # format_reward imports this name

# ------------------------------------------------------------------------------------- text


_UPRIGHT_E_I = re.compile(r"\\(?:mathrm|textrm|text|operatorname|mathit|rm)\s*\{\s*([ei])\s*\}")
_THOUSANDS = re.compile(
    r"(?<![\d.,])(\d{1,3})((?:(?:\\[,;:! ]|~|\{,\}|\\thinspace\s*|[ \u00a0\u2009\u202f])\d{3})+)(?![\d]|[.,]\d)")
_THOUSANDS_SEP = re.compile(r"\\[,;:! ]|~|\{,\}|\\thinspace\s*|[ \u00a0\u2009\u202f]")
_ESCAPED_DOLLAR = re.compile(r"\\\$(?=\s*\d)")
_SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?!\w|\.\d)")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:[ ,]\d{3})+|\d+)(?:[.,]\d+)?\s*%?|-?\.\d+\s*%?")


def clean(text: str) -> str:
    """Rewrite the notations math-verify misreads (see the module docstring, step 2)."""
    text = _UPRIGHT_E_I.sub(r"\1", text)
    text = _ESCAPED_DOLLAR.sub("", text)
    text = _THOUSANDS.sub(lambda m: m.group(1) + _THOUSANDS_SEP.sub("", m.group(2)), text)
    return _SCIENTIFIC.sub(_expand_scientific, text)


def _expand_scientific(m: re.Match) -> str:
    """``1.5e-3`` -> ``0.0015``: written out exactly, a plain number in text and in LaTeX alike."""
    if abs(int(m.group(2))) > 1000:
        return m.group(0)
    return format(Decimal(m.group(1) + "e" + m.group(2)), "f")


def boxed_answer(text: str) -> str | None:
    """The final boxed answer as math-verify reads it (latex2sympy2_extended's
    ``extract_boxed_content``: the last ``\\boxed{}`` plus the boxes before it that are under 10
    characters away, or under 70 with ",", ";", "and" or "or" between them and other contents),
    as ``\\boxed{a,b}``; None without a complete ``\\boxed{…}``/``\\fbox{…}``."""
    if not _has_complete_box(text):
        return None
    _math_verify()
    return "\\boxed{%s}" % _sympy["extract_boxed_content"](text, mode="last")


def _has_complete_box(text: str) -> bool:
    """Whether some ``\\boxed{``/``\\fbox{`` has its closing brace (one pass over the text)."""
    opens = {m.end() - 1 for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)}
    depth, pending = 0, []  # pending: brace depth outside each open box
    for i, ch in enumerate(text):
        if ch == "{":
            if i in opens:
                pending.append(depth)
            depth += 1
        elif ch == "}":
            depth -= 1
            while pending and depth < pending[-1]:
                pending.pop()
            if pending and depth == pending[-1]:
                return True
    return False


# ------------------------------------------------------------------------------------- math-verify

_mv = None
_mv_lock = threading.Lock()
_sympy: dict = {}  # names used per sample, looked up once (a function-level import costs ~1 ms)


def _math_verify():
    global _mv
    with _mv_lock:
        if _mv is None:
            import math_verify

            import sympy
            from latex2sympy2_extended.math_normalization import extract_boxed_content
            from math_verify.grader import sympy_numeric_eq

            for name in ("math_verify", "math_verify.parser", "math_verify.grader", "math_verify.utils",
                         "latex2sympy2_extended"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
            _sympy.update(Number=sympy.Number, nan=sympy.nan, srepr=sympy.srepr, numeric_eq=sympy_numeric_eq,
                          extract_boxed_content=extract_boxed_content)
            _mv = math_verify
        return _mv


def _configs(latex_only: bool = False):
    mv = _math_verify()
    latex = mv.LatexExtractionConfig(boxed_match_priority=0)
    return [latex] if latex_only else [latex, mv.ExprExtractionConfig()]


def parse_completion(text: str, strict: bool = False, timeout_s: float | None = 5) -> list:
    """math-verify's reading of a completion: a list of sympy objects (and a fallback string)."""
    text = as_text(text)
    after_thinking = text.rpartition("</think>")[2]
    if after_thinking.strip():
        text = after_thinking
    tags = [t for t in _ANSWER_TAG.findall(text) if t.strip()]
    if tags:
        text = tags[-1]
    text = clean(text)
    if strict:
        text = boxed_answer(text)
        if text is None:
            return []
    return _parse(text, latex_only=strict, timeout_s=timeout_s)


@functools.lru_cache(maxsize=1024)
def parse_gold(gold: str, timeout_s: float | None = 5) -> tuple:
    """math-verify's reading of a gold answer cell (module docstring, step 4); cached."""
    gold = gold.strip()
    if "####" in gold:
        gold = gold.rsplit("####", 1)[1].strip()
    gold = clean(gold)
    if re.search(r"\\boxed|\\fbox|\$|\\\(|\\\[", gold):
        return tuple(_parse(gold, timeout_s=timeout_s))
    if _PLAIN_NUMBER.fullmatch(gold):
        return tuple(_parse(gold, timeout_s=timeout_s))
    return tuple(_parse("$%s$" % gold, latex_only=True, timeout_s=timeout_s))


def _parse(text: str, latex_only: bool = False, timeout_s: float | None = 5) -> list:
    mv = _math_verify()
    try:
        return mv.parse(text, _configs(latex_only), parsing_timeout=_seconds(timeout_s))
    except Exception:  # noqa: BLE001 - an unreadable answer is no answer
        return []


def _seconds(timeout_s):
    """math-verify's timeouts are whole seconds via SIGALRM: main thread only, else none."""
    if timeout_s is None or threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(round(timeout_s)))


def score_answer(gold, completion, strict: bool = False, precision: int = 6,
                 timeout_s: float | None = 5) -> float:
    """1.0 when the completion's final answer has the gold answer's value, 0.0 when not, NaN
    when the gold cell itself cannot be read (a data error, counted as a reward failure)."""
    gold_parsed = parse_gold(_gold_text(gold), timeout_s)
    if not gold_parsed:
        return math.nan
    pred = parse_completion(completion, strict=strict, timeout_s=timeout_s)
    if not pred:
        return 0.0
    # A group's samples often reach the same answer: compare each (gold, answer) pair once.
    key = (_gold_text(gold), precision, tuple(_key(p) for p in pred))
    with _verdicts_lock:
        if key in _verdicts:
            _verdicts.move_to_end(key)
            return 1.0 if _verdicts[key] else 0.0
    try:
        ok = _numbers_equal(gold_parsed, pred, precision)
        if ok is None:
            ok = bool(_math_verify().verify(list(gold_parsed), pred, float_rounding=precision,
                                            timeout_seconds=_seconds(timeout_s)))
    except Exception:  # noqa: BLE001
        ok = False
    with _verdicts_lock:
        _verdicts[key] = ok
        while len(_verdicts) > 4096:
            _verdicts.popitem(last=False)
    return 1.0 if ok else 0.0


def _numbers_equal(gold: tuple, pred: list, precision: int) -> bool | None:
    """``verify``'s verdict when every parsed item on both sides is a plain number: its steps
    (``==``, rounding floats to ``precision`` places, a zero difference) without the call to
    ``simplify``, which is the identity on a difference of two numbers; None otherwise."""
    Number, nan, sympy_numeric_eq = _sympy["Number"], _sympy["nan"], _sympy["numeric_eq"]
    g_num = [g for g in gold if not isinstance(g, str)]
    p_num = [p for p in pred if not isinstance(p, str)]
    if not g_num or not p_num or not all(isinstance(x, Number) and x != nan for x in g_num + p_num):
        return None
    g_str = {g.strip() for g in gold if isinstance(g, str)} - {""}
    return (any(g == p or sympy_numeric_eq(g, p, precision, 15) or (g - p).is_zero for g in g_num for p in p_num)
            or any(p.strip() in g_str for p in pred if isinstance(p, str)))


_verdicts: OrderedDict = OrderedDict()
_verdicts_lock = threading.Lock()


def _key(parsed) -> str:
    if isinstance(parsed, str):
        return "str:" + parsed
    return _sympy["srepr"](parsed)


def _gold_text(gold) -> str:
    if isinstance(gold, (int, Fraction)):
        return str(gold)
    if isinstance(gold, float):
        return repr(gold)
    return str(gold)


# ------------------------------------------------------------------------------------- the reward


def make_math_answer(strict: bool = False, precision: int = 6, timeout_s: float = 5.0):
    """A ``math_answer`` reward with options (the built-in is ``make_math_answer()``).

    ``strict``: only a ``\\boxed{}`` answer counts (no "the answer is", no last number).
    ``precision``: decimal places to which floats are rounded before comparing (math-verify's
    ``float_rounding``). ``timeout_s``: per parse and per comparison in the main thread; a sample
    sent to a verifier process gets ``3 * max(1, timeout_s) + 2`` s before its process is killed.
    Use it from a file: ``my_rewards.py: math_boxed = make_math_answer(strict=True)`` and
    ``reward_funcs=[my_rewards.py:math_boxed]``.
    """
    if not isinstance(precision, int) or isinstance(precision, bool) or precision < 0:
        raise ValueError("math_answer: precision must be a whole number of decimal places >= 0, got %r"
                         % (precision,))
    if not timeout_s or timeout_s <= 0:
        raise ValueError("math_answer: timeout_s must be > 0, got %r" % (timeout_s,))
    opts = {"strict": bool(strict), "precision": precision, "timeout_s": float(timeout_s)}

    def math_answer(prompts=None, completions=None, answer=None, **kwargs):
        """1.0 when the completion's final answer equals the row's ``answer`` by value, else 0.0;
        None where the row has no answer; NaN (a reward failure) where the gold cannot be read. Other keywords (TRL's ``completion_ids``,
        ``trainer_state``, other columns) are accepted and unused."""
        if completions is None:
            raise TypeError("math_answer needs completions=")
        if answer is None:
            return [None] * len(completions)
        if len(answer) != len(completions):
            raise ValueError("math_answer: %d answers for %d completions" % (len(answer), len(completions)))
        texts = [as_text(c) for c in completions]
        todo = [i for i, g in enumerate(answer) if g is not None and str(g).strip()]
        out = [None] * len(completions)
        if threading.current_thread() is threading.main_thread():
            for i in todo:
                out[i] = score_answer(answer[i], texts[i], **opts)
        else:
            pool = _pool()
            with ThreadPoolExecutor(pool.size) as ex:
                scores = ex.map(lambda i: pool.score(_gold_text(answer[i]), texts[i], opts), todo)
                for i, s in zip(todo, scores):
                    out[i] = s
        return out

    return math_answer


math_answer = make_math_answer()


# ------------------------------------------------------------------------------------- processes


class _VerifierPool:
    """Verifier processes (``_serve``) for calls off the main thread; one sample at a time each.

    Protocol: one JSON line ``[gold, completion, opts]`` in, one line ``1``/``0``/``nan`` out. A process
    that misses its deadline or dies is killed and replaced on the next call.
    """

    def __init__(self, size: int):
        self.size = size
        self._idle: list[subprocess.Popen] = []
        self._live = 0  # processes running or starting
        self._cond = threading.Condition()
        self._warned = False

    def score(self, gold: str, completion: str, opts: dict) -> float:
        proc = self._acquire()
        ok = False
        try:
            proc.stdin.write((json.dumps([gold, completion, opts]) + "\n").encode())
            proc.stdin.flush()
            deadline = _deadline(opts["timeout_s"])
            ready, _, _ = select.select([proc.stdout], [], [], deadline)
            line = proc.stdout.readline().strip() if ready else b""
            ok = line in (b"0", b"1", b"nan")
            if not ok and not self._warned:
                self._warned = True
                log.warning("math_answer: a sample took over %.0f s (or its verifier process died); "
                            "it scores 0 and the process is replaced", deadline)
            return math.nan if line == b"nan" else 1.0 if line == b"1" else 0.0
        except OSError:
            return 0.0
        finally:
            self._release(proc, keep=ok)

    def _acquire(self) -> subprocess.Popen:
        with self._cond:
            while not self._idle and self._live >= self.size:
                self._cond.wait()
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:  # started from one long-lived thread: the child's parent-death signal follows that thread
            return _SPAWNER.submit(_start_verifier).result()
        except BaseException:
            self._release(None, keep=False)
            raise

    def _release(self, proc, keep: bool):
        if not keep and proc is not None:
            _kill(proc)
        with self._cond:
            if keep:
                self._idle.append(proc)
            else:
                self._live -= 1
            self._cond.notify()

    def close(self):
        with self._cond:
            procs, self._idle = self._idle, []
        for p in procs:
            _kill(p)


def _deadline(timeout_s: float) -> float:
    """Seconds a verifier process gets per sample: a parse and up to two comparisons, each
    bounded by math-verify's own (whole-second) timeout inside the process, plus slack."""
    return 3 * max(1.0, timeout_s) + 2


_POOL: _VerifierPool | None = None
_SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="lmpo-math-verifier")
_POOL_LOCK = threading.Lock()


def _pool() -> _VerifierPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _VerifierPool(min(4, os.cpu_count() or 1))
            atexit.register(_POOL.close)
        return _POOL


def _start_verifier() -> subprocess.Popen:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys; sys.path.insert(0, %r); from lmpo.rewards.math_reward import _serve; _serve(%d)"
            % (root, os.getpid()))
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    if not ready or proc.stdout.readline().strip() != b"ready":
        _kill(proc)
        raise RuntimeError("math_answer: the verifier process did not start (python -c ... _serve())")
    return proc


def _kill(proc):
    try:
        proc.kill()
        proc.wait(timeout=10)
    except Exception:  # noqa: BLE001
        pass
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except Exception:  # noqa: BLE001
            pass


def _serve(parent_pid: int | None = None):
    """Verifier process: answer ``[gold, completion, opts]`` lines with ``1``, ``0`` or ``nan``; exits at
    the end of stdin, and (Linux) is killed when the thread of the trainer that started it ends."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        return  # the trainer is already gone
    _math_verify()
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        try:
            gold, completion, opts = json.loads(line)
            score = score_answer(gold, completion, **opts)
        except Exception:  # noqa: BLE001
            score = 0.0
        out.write(b"nan\n" if math.isnan(score) else b"1\n" if score == 1.0 else b"0\n")
        out.flush()
