"""Reward robustness in the loop: resolve reward specs, call them as TRL does, combine them safely.

The training loop calls :func:`resolve_reward_funcs` once and :func:`compute_rewards` once
per step, with the keywords of TRL 1.16's GRPOTrainer (:func:`reward_inputs`, :class:`TrainerState`).
A reward function that raises, exits, hangs past its timeout, or returns NaN/inf for a sample,
makes those samples invalid (NaN reward, no gradient) and is counted and logged; a function that
returns the wrong shape, or cannot take the keywords, is a bug and always raises :class:`RewardError`;
a source that gives nothing on every sample for several steps stops the run
(:func:`watch_total_failure`).
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .errors import RewardError
from lmpo.rewards import REWARD_FUNCS

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
    errors: dict[str, str] = field(default_factory=dict)      # per function: its first error, or why it gave nothing
    logged: dict[str, float] = field(default_factory=dict)    # log_metric: the batch's mean of each name
    extra: dict[str, list] = field(default_factory=dict)      # log_extra: column -> one value per sample

    def dead(self) -> dict[str, str]:
        """The functions that failed or returned None on every sample, with their first error."""
        return {name: self.errors.get(name, "failed on every sample") for name, values in self.per_func.items()
                if values and all(v is None or not math.isfinite(v) for v in values)}


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

# The keywords every reward function gets besides the dataset's columns (TRL 1.16's GRPOTrainer).
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")


@dataclass
class TrainerState:
    """What reward functions read from their ``trainer_state`` keyword (the fields of transformers'
    ``TrainerState`` that TRL's reward shaping uses): optimizer steps done before this batch, the
    run's ``max_steps``, and passes over the prompt dataset so far (fractional)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


def reward_inputs(rows: list[dict], completions: list[str]) -> tuple[list, list, dict]:
    """(prompts, completions, columns) of a batch of sampled rows, in TRL's two forms.

    ``prompts``: each row's ``prompt`` as stored (a string, or a list of chat messages).
    ``completions``: the text, or ``[{"role": "assistant", "content": text}]`` where the row's
    prompt is chat messages. ``columns``: every other column of the rows, one list each (None
    where a row lacks it); as in TRL, a dataset's ``completion`` and ``completion_ids`` columns
    are not passed.
    """
    prompts = [r["prompt"] for r in rows]
    comps = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c
             for p, c in zip(prompts, completions)]
    keys = list(dict.fromkeys(k for r in rows for k in r if k not in ("prompt", "completion", "completion_ids")))
    clash = [k for k in keys if k in RESERVED]
    if clash:
        raise RewardError("dataset column %r has the name of a keyword that reward functions get (%s); "
                          "rename the column." % (clash[0], ", ".join(RESERVED)))
    return prompts, comps, {k: [r.get(k) for r in rows] for k in keys}


@dataclass(frozen=True)
class CallPolicy:
    """How a batch's reward functions are called: at most ``max_workers`` plain functions at once,
    ``timeout_s`` seconds each (None = no limit; a late one fails the batch), and ``on_error``:
    "skip" (failed samples become invalid, counted and logged) or "raise" (the first failure
    raises RewardError naming function, sample and cause)."""

    max_workers: int = 4
    on_error: str = "skip"
    timeout_s: float | None = None


def compute_rewards(funcs, weights, prompts, completions, columns=None, *, completion_ids=None,
                    trainer_state=None, how: CallPolicy = CallPolicy()) -> RewardResult:
    """Run every reward function on the batch (concurrently) and combine them: Σ_k w_k·r_k per
    sample, over the functions that scored it (None = abstain); a NaN, inf or raised call makes
    the sample invalid (reward NaN).

    ``funcs``: [(name, function)] as returned by :func:`resolve_reward_funcs` (bare
    callables and specs are resolved too). ``weights``: one per function, or None for all 1.
    Each function is called as TRL calls it: ``f(prompts=, completions=, completion_ids=,
    **columns, trainer_state=, log_metric=, log_extra=)``; ``columns`` are the dataset's other
    columns, lists aligned with ``completions``. ``async def`` functions are awaited together.
    ``how``: workers, timeout and what a failure does (``CallPolicy``).
    """
    if how.on_error not in ("skip", "raise"):
        raise RewardError("on_error must be 'skip' or 'raise', got %r" % (how.on_error,))
    funcs = [f if isinstance(f, tuple) and len(f) == 2 else resolve_reward_funcs([f])[0] for f in funcs]
    n = len(completions)
    weights = [1.0] * len(funcs) if weights is None else [float(w) for w in weights]
    columns = dict(columns or {})
    _check_batch(funcs, weights, prompts, n, columns, completion_ids)
    logs = RewardLogs(n)
    kwargs = {"prompts": list(prompts), "completions": list(completions), "completion_ids": completion_ids,
              **columns, "trainer_state": trainer_state or TrainerState(),
              "log_metric": logs.log_metric, "log_extra": logs.log_extra}
    for name, func in funcs:
        check_arguments(name, func, kwargs)
    outputs = call_all(funcs, kwargs, how.timeout_s, how.max_workers)
    acc = _Combined(n)
    for (name, _), w, (out, exc, seconds) in zip(funcs, weights, outputs):
        acc.add(name, w, out, exc, seconds, how.on_error)
        if all(v is None for v in acc.per_func[name]):
            acc.errors.setdefault(name, "returned None for every sample (the keywords it got: %s)"
                                  % ", ".join(k for k in kwargs))
    return acc.result(logs)


def _check_batch(funcs, weights, prompts, n: int, columns: dict, completion_ids):
    """RewardError when the batch's parts do not line up: weights with functions, prompts, columns
    and completion ids with the ``n`` completions."""
    if len(weights) != len(funcs):
        raise RewardError("got %d reward weights for %d reward functions (%s)"
                          % (len(weights), len(funcs), ", ".join(name for name, _ in funcs)))
    if len(prompts) != n:
        raise RewardError("got %d prompts for %d completions" % (len(prompts), n))
    for key, col in columns.items():
        if len(col) != n:
            raise RewardError("column %r has %d values for %d completions" % (key, len(col), n))
    if completion_ids is not None and len(completion_ids) != n:
        raise RewardError("got %d completion_ids for %d completions" % (len(completion_ids), n))


class _Combined:
    """The weighted sum over reward functions as their outputs come in, with per-function values,
    metrics, failures and each function's first error."""

    def __init__(self, n: int):
        self.n, self.per_func, self.metrics, self.failures, self.errors = n, {}, {}, [], {}
        self.total, self.numbers_seen, self.failed = [0.0] * n, [0] * n, [False] * n

    def add(self, name: str, w: float, out, exc, seconds: float, on_error: str):
        n = self.n
        self.metrics["time/reward/%s_s" % name] = seconds
        if exc is not None:
            msg = "reward %r raised on the batch (samples 0-%d): %s" % (name, n - 1, describe(exc))
            self.errors[name] = describe(exc)
            if on_error == "raise":
                raise RewardError("reward function %r failed on sample 0 (the whole batch of %d): %s"
                                  % (name, n, describe(exc))) from exc
            self.failures.append(msg)
            values = [math.nan] * n
        else:
            values = _check_output(name, out, n)
        for i, v in enumerate(values):
            if v is None:
                continue
            if math.isfinite(v):
                self.total[i] += w * v
                self.numbers_seen[i] += 1
            else:
                self.failed[i] = True
                if exc is None:
                    line = "reward %r returned %r for sample %d" % (name, v, i)
                    if on_error == "raise":
                        raise RewardError("reward function %r failed on sample %d: returned %r"
                                          % (name, i, v))
                    self.errors.setdefault(name, "returned %r for sample %d" % (v, i))
                    self.failures.append(line)
        nums = [v for v in values if v is not None and math.isfinite(v)]
        self.per_func[name] = values
        self.metrics["reward/%s/mean" % name] = sum(nums) / len(nums) if nums else math.nan
        self.metrics["reward/%s/failures" % name] = float(sum(1 for v in values if v is not None and not math.isfinite(v)))

    def result(self, logs) -> RewardResult:
        n, metrics, failures = self.n, self.metrics, self.failures
        valid = [not self.failed[i] and self.numbers_seen[i] > 0 for i in range(n)]
        rewards = [self.total[i] if valid[i] else math.nan for i in range(n)]
        good = [r for r, ok in zip(rewards, valid) if ok]
        metrics["reward/mean"] = sum(good) / len(good) if good else math.nan
        metrics["reward/invalid"] = float(n - len(good))
        if failures:
            log.warning("%d reward failure(s) in a batch of %d: %s%s", len(failures), n,
                        "; ".join(failures[:3]), " ..." if len(failures) > 3 else "")
        return RewardResult(rewards, valid, self.per_func, metrics, failures, self.errors, logs.metrics(), logs.extra)


class RewardLogs:
    """The ``log_metric`` and ``log_extra`` callables a batch's reward functions get (as in TRL):
    ``log_metric(name, value)`` adds a scalar (several calls on a batch are averaged);
    ``log_extra(column, values)`` attaches one value per completion to the samples."""

    def __init__(self, n: int):
        self.n, self.lock, self.scalars, self.extra = n, threading.Lock(), {}, {}

    def log_metric(self, name: str, value: float):
        with self.lock:
            self.scalars.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: list):
        values = list(values)
        if len(values) != self.n:
            raise RewardError("log_extra(%r, values) got %d values for %d completions"
                              % (column, len(values), self.n))
        with self.lock:
            self.extra[str(column)] = values

    def metrics(self) -> dict:
        return {k: sum(v) / len(v) for k, v in self.scalars.items()}


def check_arguments(name, func, kwargs):
    """A RewardError naming the function and the keyword when ``func`` cannot take ``kwargs``: a
    required parameter that is no dataset column, or no ``**kwargs`` to take the keywords it does
    not name."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin or extension callable: let the call decide
        return
    try:
        sig.bind(**kwargs)
        return
    except TypeError as e:
        why = str(e)
    params = sig.parameters.values()
    columns = ", ".join(k for k in kwargs if k not in RESERVED) or "none"
    for p in params:
        if p.kind is not p.VAR_POSITIONAL and p.kind is not p.VAR_KEYWORD and p.default is p.empty \
                and (p.name not in kwargs or p.kind is p.POSITIONAL_ONLY):
            raise RewardError("reward function %r needs the argument %r, which is neither a keyword lmpo passes "
                              "(%s) nor a dataset column (the columns are: %s). Add a %r column to the dataset, "
                              "or give the parameter a default." % (name, p.name, ", ".join(RESERVED), columns, p.name))
    extra = [k for k in kwargs if k not in sig.parameters]
    if extra and not any(p.kind is p.VAR_KEYWORD for p in params):
        raise RewardError("reward function %r does not accept the keyword %r. Reward functions are called as "
                          "TRL calls them, with the keywords %s and every dataset column (here: %s); add **kwargs "
                          "to its parameters." % (name, extra[0], ", ".join(RESERVED), columns))
    raise RewardError("reward function %r cannot be called with the keywords %s: %s"
                      % (name, ", ".join(kwargs), why))


def _is_async(func) -> bool:
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


def call_all(funcs, kwargs: dict, timeout_s: float | None = None, max_workers: int = 4) -> list[tuple]:
    """Call every (name, function) with ``kwargs``; returns [(output, exception, seconds)] in order.

    Plain functions run in daemon threads, at most ``max_workers`` at once; ``async def`` ones
    are awaited together on one event loop in another daemon thread (as TRL gathers them). A call
    still running ``timeout_s`` seconds after its start is reported as a TimeoutError and left
    behind (a thread cannot be killed; a daemon thread does not keep the process alive).
    Any exception, SystemExit included, comes back as the call's exception.
    """
    results: list = [None] * len(funcs)
    done: queue.SimpleQueue = queue.SimpleQueue()
    started: dict[int, float] = {}
    asyncs = [i for i, (_, f) in enumerate(funcs) if _is_async(f)]
    waiting = [i for i in range(len(funcs)) if i not in asyncs]
    running_sync: set[int] = set()
    if asyncs:
        t0 = time.perf_counter()
        started.update({i: t0 for i in asyncs})
        threading.Thread(target=asyncio.run, args=(_gather(funcs, asyncs, kwargs, t0, done),), daemon=True,
                         name="lmpo-reward-async").start()
    while any(r is None for r in results):
        while waiting and len(running_sync) < max(1, max_workers):
            i = waiting.pop(0)
            started[i] = time.perf_counter()
            running_sync.add(i)
            threading.Thread(target=_call_sync, args=(funcs[i][1], kwargs, i, started[i], done), daemon=True,
                             name="lmpo-reward-%s" % funcs[i][0]).start()
        pending = [i for i in started if results[i] is None]
        wait = None
        if timeout_s is not None:
            wait = max(0.0, min(started[i] for i in pending) + timeout_s - time.perf_counter())
        try:
            i, out, exc, seconds = done.get(timeout=wait)
        except queue.Empty:
            for i in _timed_out(pending, started, timeout_s, results):
                running_sync.discard(i)
            continue
        if results[i] is None:
            results[i] = (out, exc, seconds)
            running_sync.discard(i)
    return results


def _call_sync(fn, kwargs: dict, i: int, t0: float, done: queue.SimpleQueue):
    """Call i's (output, exception, seconds) onto ``done``: any exception, never raised here."""
    try:
        done.put((i, fn(**kwargs), None, time.perf_counter() - t0))
    except BaseException as e:  # noqa: BLE001 - SystemExit too: reported, never raised here
        done.put((i, None, e, time.perf_counter() - t0))


async def _call_async(fn, kwargs: dict, i: int, t0: float, done: queue.SimpleQueue):
    try:
        out = await fn(**kwargs)
        done.put((i, out, None, time.perf_counter() - t0))
    except BaseException as e:  # noqa: BLE001
        done.put((i, None, e, time.perf_counter() - t0))


async def _gather(funcs, idx: list[int], kwargs: dict, t0: float, done: queue.SimpleQueue):
    await asyncio.gather(*(_call_async(funcs[i][1], kwargs, i, t0, done) for i in idx))


def _timed_out(pending: list[int], started: dict, timeout_s: float, results: list) -> list[int]:
    """The pending calls past ``timeout_s`` since their start, each given a TimeoutError result."""
    now, out = time.perf_counter(), []
    for i in pending:
        if now - started[i] >= timeout_s:
            results[i] = (None, TimeoutError(
                "did not return within reward_timeout_s=%g s (left running in the background)"
                % timeout_s), now - started[i])
            out.append(i)
    return out


def describe(exc: BaseException) -> str:
    """One line for a reward function's exception."""
    if isinstance(exc, SystemExit):
        return "SystemExit: the reward function called sys.exit(%r)" % (exc.code,)
    return "%s: %s" % (type(exc).__name__, exc)


def watch_total_failure(streaks: dict, names, dead: dict, fail_steps: int, step: int, timeout_s=None):
    """Stop a run whose reward source has stopped working.

    ``dead`` maps the sources that failed (raised, timed out, NaN) or returned None on every sample
    of this batch to their first error. ``streaks`` (kept by the caller across batches) counts each
    source's consecutive dead batches; at ``fail_steps`` (0 = never) a RewardError names the source,
    its first error and the config keys that change this.
    """
    for name in names:
        if name not in dead:
            streaks.pop(name, None)
            continue
        count, first_step, first = streaks.get(name, (0, step, dead[name]))
        streaks[name] = (count + 1, first_step, first)
        if fail_steps and count + 1 >= fail_steps:
            raise RewardError(
                "reward source %r failed or returned None on every sample of %d consecutive steps (steps %d-%d), "
                "so nothing was learned from it. First error (step %d): %s. Fix the function or the dataset "
                "columns it reads; or change the config keys reward_fail_steps (now %d; 0 = never stop), "
                "reward_timeout_s (now %s s), reward_funcs / reward_model / reward_url (the sources)."
                % (name, count + 1, first_step, step, first_step, first, fail_steps, timeout_s))


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
