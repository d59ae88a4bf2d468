"""Reward robustness in the loop: resolve reward specs, run them, combine them safely.

The training loop calls :func:`resolve_reward_funcs` once and :func:`compute_rewards` once
per step. A reward function that raises, or returns NaN/inf for a sample, makes those samples
invalid (NaN reward, no gradient) and is counted and logged; a function that returns the wrong
shape is a bug and always raises :class:`RewardError`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
import math
import numbers
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from .errors import RewardError

log = logging.getLogger(__name__)

RewardFunc = Callable[..., list]


@dataclass
class RewardResult:
    """Rewards of one batch. ``rewards[i]`` = Σ_k w_k r_k(i) over the functions that returned a
    number for sample i; NaN where ``valid[i]`` is False (a function failed on the sample, or
    every function returned None for it)."""

    rewards: list[float]
    valid: list[bool]
    per_func: dict[str, list[float | None]]  # None = not applicable, NaN = failed
    metrics: dict[str, float]
    failures: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- resolving


def resolve_reward_funcs(specs) -> list[tuple[str, RewardFunc]]:
    """Reward specs -> [(name, function)].

    A spec is a callable, a built-in name (``lmpo.rewards.REWARD_FUNCS``), ``module:function``
    (the module importable from the working directory) or ``path/to/file.py:function``.
    Names are made unique by suffixing ``_2``, ``_3``, ... Unknown specs raise RewardError.
    """
    if isinstance(specs, (str, bytes)) or callable(specs):
        specs = [specs]
    out, seen = [], {}
    for spec in specs:
        name, func = _resolve_one(spec)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = "%s_%d" % (name, seen[name])
        out.append((name, func))
    return out


def _resolve_one(spec):
    from . import REWARD_FUNCS

    if callable(spec):
        return _name_of(spec), spec
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError("reward spec %r is neither a callable nor a string" % (spec,))
    spec = spec.strip()
    if spec in REWARD_FUNCS:
        return spec, REWARD_FUNCS[spec]
    if ":" in spec:
        where, _, attr = spec.rpartition(":")
        if where.endswith(".py") or os.sep in where or "/" in where:
            module = _import_file(spec, where)
        else:
            module = _import_module(spec, where)
        try:
            func = getattr(module, attr)
        except AttributeError:
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n)))
            raise RewardError("reward spec %r: %s has no attribute %r (callables there: %s)"
                              % (spec, where, attr, ", ".join(public) or "none")) from None
        if not callable(func):
            raise RewardError("reward spec %r: %s.%s is a %s, not a function"
                              % (spec, where, attr, type(func).__name__))
        return attr, func
    close = difflib.get_close_matches(spec, list(REWARD_FUNCS), n=3, cutoff=0.5)
    hint = " Did you mean %s?" % " or ".join(repr(c) for c in close) if close else ""
    raise RewardError(
        "Unknown reward function %r.%s A reward spec is a built-in name (%s), "
        "'module:function' with the module importable from the working directory, or "
        "'path/to/file.py:function'." % (spec, hint, ", ".join(sorted(REWARD_FUNCS))))


def _import_module(spec, module_name):
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except Exception as e:
        raise RewardError("reward spec %r: cannot import module %r from %s: %s: %s"
                          % (spec, module_name, cwd, type(e).__name__, e)) from e


def _import_file(spec, path):
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise RewardError("reward spec %r: file %s does not exist" % (spec, full))
    mod_name = "lmpo_reward_file_%x" % (hash(full) & 0xFFFFFFFF)
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    loader_spec = importlib.util.spec_from_file_location(mod_name, full)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise RewardError("reward spec %r: importing %s failed: %s: %s"
                          % (spec, full, type(e).__name__, e)) from e
    return module


def _name_of(func) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    return str(name)


# ----------------------------------------------------------------------------- computing


def compute_rewards(funcs, weights, prompts, completions, columns=None, *, max_workers=4,
                    on_error="skip") -> RewardResult:
    """Run every reward function on the batch (concurrently) and combine them.

    ``funcs``: [(name, function)] as returned by :func:`resolve_reward_funcs` (bare
    callables and specs are resolved too). ``weights``: one per function, or None for all 1.
    ``columns``: the dataset's other columns, lists aligned with ``completions``.
    ``on_error``: "skip" (failed samples become invalid, counted and logged) or "raise"
    (the first failure raises RewardError naming function, sample and cause).
    """
    if on_error not in ("skip", "raise"):
        raise RewardError("on_error must be 'skip' or 'raise', got %r" % (on_error,))
    funcs = [f if isinstance(f, tuple) and len(f) == 2 else resolve_reward_funcs([f])[0] for f in funcs]
    n = len(completions)
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(funcs):
        raise RewardError("got %d reward weights for %d reward functions (%s)"
                          % (len(weights), len(funcs), ", ".join(name for name, _ in funcs)))
    if len(prompts) != n:
        raise RewardError("got %d prompts for %d completions" % (len(prompts), n))
    columns = dict(columns or {})
    for key, col in columns.items():
        if len(col) != n:
            raise RewardError("column %r has %d values for %d completions" % (key, len(col), n))

    def call(item):
        name, func = item
        t0 = time.perf_counter()
        try:
            return func(list(prompts), list(completions), **columns), None, time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - judged below by on_error
            return None, e, time.perf_counter() - t0

    if len(funcs) <= 1 or max_workers <= 1:
        outputs = [call(item) for item in funcs]
    else:
        with ThreadPoolExecutor(min(max_workers, len(funcs)), thread_name_prefix="lmpo-reward") as pool:
            outputs = list(pool.map(call, funcs))

    per_func, metrics, failures = {}, {}, []
    total = [0.0] * n
    numbers_seen = [0] * n
    failed = [False] * n
    for (name, _), w, (out, exc, seconds) in zip(funcs, weights, outputs):
        metrics["time/reward/%s_s" % name] = seconds
        if exc is not None:
            msg = "reward %r raised on the batch (samples 0-%d): %s: %s" % (name, n - 1, type(exc).__name__, exc)
            if on_error == "raise":
                raise RewardError("reward function %r failed on sample 0 (the whole batch of %d): %s: %s"
                                  % (name, n, type(exc).__name__, exc)) from exc
            failures.append(msg)
            values = [math.nan] * n
        else:
            values = _check_output(name, out, n)
        for i, v in enumerate(values):
            if v is None:
                continue
            if math.isfinite(v):
                total[i] += w * v
                numbers_seen[i] += 1
            else:
                failed[i] = True
                if exc is None:
                    line = "reward %r returned %r for sample %d" % (name, v, i)
                    if on_error == "raise":
                        raise RewardError("reward function %r failed on sample %d: returned %r"
                                          % (name, i, v))
                    failures.append(line)
        nums = [v for v in values if v is not None and math.isfinite(v)]
        per_func[name] = values
        metrics["reward/%s/mean" % name] = sum(nums) / len(nums) if nums else math.nan
        metrics["reward/%s/failures" % name] = float(sum(1 for v in values if v is not None and not math.isfinite(v)))
    valid = [not failed[i] and numbers_seen[i] > 0 for i in range(n)]
    rewards = [total[i] if valid[i] else math.nan for i in range(n)]
    good = [r for r, ok in zip(rewards, valid) if ok]
    metrics["reward/mean"] = sum(good) / len(good) if good else math.nan
    metrics["reward/invalid"] = float(n - len(good))
    if failures:
        log.warning("%d reward failure(s) in a batch of %d: %s%s", len(failures), n,
                    "; ".join(failures[:3]), " ..." if len(failures) > 3 else "")
    return RewardResult(rewards, valid, per_func, metrics, failures)


def _check_output(name, out, n) -> list[float | None]:
    """Shape errors are bugs (RewardError); a bad value is a per-sample failure (NaN)."""
    if not isinstance(out, (list, tuple)):
        raise RewardError("reward function %r returned a %s; expected a list of %d floats (or None)"
                          % (name, type(out).__name__, n))
    if len(out) != n:
        raise RewardError("reward function %r returned %d values for %d completions (expected length %d, got %d)"
                          % (name, len(out), n, n, len(out)))
    values = []
    for v in out:
        if v is None:
            values.append(None)
        elif isinstance(v, numbers.Real) or hasattr(v, "__float__") and not isinstance(v, (str, bytes)):
            try:
                values.append(float(v))
            except (TypeError, ValueError):
                values.append(math.nan)
        else:
            values.append(math.nan)  # a string or other junk counts as a failure
    return values
