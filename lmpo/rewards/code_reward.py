"""Code execution reward: the fraction of a row's tests that the completion's code passes."""

from __future__ import annotations

import ast
import logging
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

from . import sandbox
from .sandbox import SandboxLimits, run_code
from .text import as_text

log = logging.getLogger(__name__)

_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", "py3"}


def extract_code(completion: str, entry_point: str | None = None) -> str:
    """The code in a completion: with an ``entry_point``, the last fenced block that defines it
    (a reply that ends with an example-usage block is graded on its solution); else the last
    ```python fenced block, else the last fenced block of any language tag, else the whole text.
    An unclosed fence (a truncated completion) runs to the end of the text."""
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(completion)]
    if entry_point:
        defining = [body for _, body in blocks if (tree := _parses(body)) is not None and _defines(tree, entry_point)]
        if defining:
            return defining[-1]
    python = [body for tag, body in blocks if tag in _PY_TAGS]
    if python:
        return python[-1]
    untagged = [body for tag, body in blocks if not tag]
    if untagged:
        return untagged[-1]
    if blocks:
        return blocks[-1][1]
    return completion


def _parses(code: str):
    try:
        return ast.parse(code)
    except (SyntaxError, ValueError):
        return None


def _defines(tree, name: str) -> bool:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (a.asname or a.name.split(".")[0]) == name for a in node.names):
            return True
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def program(prompt, completion, entry_point: str | None = None) -> str:
    """The program to test for one sample. The code is the completion's (a string or TRL chat
    messages; fenced blocks as in :func:`extract_code`, the entry point's block first). With an ``entry_point``, when the prompt
    is Python that defines it (a HumanEval-style signature + docstring, possibly in a fenced
    block of a chat message), the prompt comes first: a completion that does not define the
    entry point continues it (the function body); one that does follows it and replaces the
    prompt's stub (the prompt's imports and helpers stay)."""
    code = extract_code(as_text(completion), entry_point)
    if not entry_point or prompt is None:
        return code
    prefix = extract_code(as_text(prompt))
    stub = _parses(prefix) or _parses(prefix.rstrip() + "\n    pass\n")  # a signature with no body yet
    if stub is None or not _defines(stub, entry_point):
        return code  # the prompt is not the entry point's code (prose, another task): nothing to prepend
    sep = "" if prefix.endswith("\n") else "\n"
    tree = _parses(code)
    if tree is not None and _defines(tree, entry_point):
        return prefix + sep + "\n" + code
    return prefix + sep + code


class CodeTests:
    """Reward = passed / total test units, each completion run in its own sandbox.

    ``tests`` (a dataset column) is either a Python test file (top-level ``assert`` statements
    and ``test_*`` functions, each one unit; or a HumanEval-style ``check(candidate)`` with an
    ``entry_point`` column) or a list of snippets, each one unit. Completions are strings or
    TRL chat messages; see :func:`program` for how the prompt is prepended. Rows without tests
    give None (not applicable); a run the sandbox could not complete gives NaN (a failure,
    logged). Where the sandbox's guarantees cannot be given at all, the call raises
    :class:`~lmpo.rewards.sandbox.SandboxUnavailable`. Samples run concurrently on a bounded
    thread pool, each in its own sandbox.
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

    def _one(self, prompt, completion, tests, entry_point):
        if tests is None or (isinstance(tests, (str, list)) and not tests):
            return None, None
        try:
            r = run_code(program(prompt, completion, entry_point), tests, entry_point=entry_point,
                         limits=self.limits, tmp_root=self.tmp_root)
        except Exception as e:  # noqa: BLE001 - a sandbox bug must not stop training
            log.warning("code_tests: sandbox failed: %s: %s", type(e).__name__, e)
            return math.nan, None
        if r.status == "error":
            log.warning("code_tests: sandbox error: %s", r.detail)
            return math.nan, r
        return r.fraction, r  # "timeout" = killed from outside: nothing passed, reward 0

    def __call__(self, prompts=None, completions=None, tests=None, entry_point=None, **_unused):
        """TRL's calling convention: keywords, columns by name, other keywords ignored."""
        if completions is None:
            raise TypeError("code_tests needs completions=")
        sandbox.check()  # SandboxUnavailable, loudly, rather than a NaN per sample
        n = len(completions)
        prompts = list(prompts) if prompts is not None else [None] * n
        tests = list(tests) if tests is not None else [None] * n
        entry = list(entry_point) if entry_point is not None else [None] * n
        futures = [self._executor().submit(self._one, p, c, t, e)
                   for p, c, t, e in zip(prompts, completions, tests, entry)]
        out = [f.result() for f in futures]
        self.last_results = [r for _, r in out]
        return [score for score, _ in out]


code_tests = CodeTests()
