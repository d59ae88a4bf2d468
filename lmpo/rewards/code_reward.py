"""Code execution reward: the fraction of a row's tests that the completion's code passes."""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

from .sandbox import SandboxLimits, run_code

log = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", "py3"}


def extract_code(completion: str) -> str:
    """The code in a completion: the last ```python fenced block, else the last fenced block
    of any language tag, else the whole text. An unclosed fence (a truncated completion) runs
    to the end of the text."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(completion)]
    python = [body for tag, body in blocks if tag in _PY_TAGS]
    if python:
        return python[-1]
    untagged = [body for tag, body in blocks if not tag]
    if untagged:
        return untagged[-1]
    if blocks:
        return blocks[-1][1]
    return completion


class CodeTests:
    """Reward = passed / total test units, each completion run in its own sandbox.

    ``tests`` (a dataset column) is either a Python test file (top-level ``assert`` statements
    and ``test_*`` functions, each one unit; or a HumanEval-style ``check(candidate)`` with an
    ``entry_point`` column) or a list of snippets, each one unit. Rows without tests give None
    (not applicable); a sandbox that could not run at all gives NaN (a failure, logged).
    Samples run concurrently on a bounded thread pool, each in its own process tree.
    """

    def __init__(self, limits: SandboxLimits | None = None, max_workers: int | None = None,
                 tmp_root: str | None = None):
        self.limits = limits or SandboxLimits()
        self.max_workers = max_workers or max(2, min(8, os.cpu_count() or 2))
        self.tmp_root = tmp_root
        self.__name__ = "code_tests"
        self._pool = None
        self._lock = threading.Lock()
        self.last_results = []  # SandboxResult per sample of the last call, for inspection

    def _executor(self):
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="lmpo-sandbox")
            return self._pool

    def _one(self, completion, tests, entry_point):
        if tests is None or (isinstance(tests, (str, list)) and not tests):
            return None, None
        try:
            r = run_code(extract_code(completion), tests, entry_point=entry_point,
                         limits=self.limits, tmp_root=self.tmp_root)
        except Exception as e:  # noqa: BLE001 - a sandbox bug must not stop training
            log.warning("code_tests: sandbox failed: %s: %s", type(e).__name__, e)
            return math.nan, None
        if r.status == "error":
            log.warning("code_tests: sandbox error: %s", r.detail)
            return math.nan, r
        return r.fraction, r  # "timeout" = killed from outside: nothing passed, reward 0

    def __call__(self, prompts, completions, tests=None, entry_point=None, **_columns):
        n = len(completions)
        tests = list(tests) if tests is not None else [None] * n
        entry = list(entry_point) if entry_point is not None else [None] * n
        futures = [self._executor().submit(self._one, c, t, e)
                   for c, t, e in zip(completions, tests, entry)]
        out = [f.result() for f in futures]
        self.last_results = [r for _, r in out]
        return [score for score, _ in out]


code_tests = CodeTests()
