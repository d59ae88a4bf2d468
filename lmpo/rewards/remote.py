"""Rewards computed by an HTTP service.

Protocol (one POST per batch): ``{"prompts": [...], "completions": [...], "columns": {...}}``
plus, when the caller has them, ``"completion_ids": [[int, ...], ...]`` and ``"trainer_state":
{"global_step", "max_steps", "epoch"}`` -> ``{"rewards": [float | null, ...]}`` (same length as
completions), optionally with ``"metrics": {name: float}`` and ``"extra": {column: [...]}``, which
go to the caller's ``log_metric`` / ``log_extra``. ``lmpo serve-reward``
(:mod:`lmpo.rewards.serve`) is a server for it.

Error policy: connection errors, timeouts, HTTP 429 and 5xx and unreadable replies are
transient: retried ``retries`` times with exponential backoff (``backoff * 2**k`` seconds).
Other HTTP 4xx errors and replies of the wrong shape are not retried. Either way the call
ends in RewardError naming the URL and the last cause; ``compute_rewards`` then treats the
batch as failed (or raises, with ``on_error="raise"``).
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request

from .errors import RewardError

log = logging.getLogger(__name__)


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, (set, frozenset, tuple)):
        return list(x)
    return str(x)


class RemoteReward:
    """A reward function that POSTs each batch to ``url``; called with TRL's keywords."""

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 3, backoff: float = 0.5,
                 name: str | None = None, headers: dict | None = None):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise RewardError("remote reward URL must be http(s)://host[:port]/path, got %r" % (url,))
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise RewardError("remote reward %s: need timeout > 0, retries >= 0, backoff >= 0" % url)
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), int(retries), float(backoff)
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.__name__ = name or "remote:%s" % parsed.netloc

    def __repr__(self):
        return "RemoteReward(%r, timeout=%s, retries=%d)" % (self.url, self.timeout, self.retries)

    def __call__(self, prompts, completions, completion_ids=None, trainer_state=None, log_metric=None,
                 log_extra=None, **columns):
        req = {"prompts": list(prompts), "completions": list(completions),
               "columns": {k: list(v) for k, v in columns.items()}}
        if completion_ids is not None:
            req["completion_ids"] = [list(ids) for ids in completion_ids]
        if trainer_state is not None:
            req["trainer_state"] = {k: getattr(trainer_state, k, None) for k in ("global_step", "max_steps", "epoch")}
        body = json.dumps(req, default=_jsonable).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._post(body)
            except _Permanent as e:
                raise RewardError("remote reward %s failed: %s" % (self.url, e)) from None
            except _Transient as e:
                last = str(e)
                log.warning("remote reward %s: attempt %d/%d failed: %s",
                            self.url, attempt + 1, self.retries + 1, last)
                continue
            rewards = self._check(reply, len(completions))
            for name, value in (reply.get("metrics") or {}).items() if log_metric is not None else ():
                log_metric(name, value)
            for column, values in (reply.get("extra") or {}).items() if log_extra is not None else ():
                log_extra(column, values)
            return rewards
        raise RewardError("remote reward %s failed after %d attempt(s); last error: %s"
                          % (self.url, self.retries + 1, last))

    def _post(self, body):
        req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace").strip()
            msg = "HTTP %d %s%s" % (e.code, e.reason, (": " + detail) if detail else "")
            if e.code == 429 or e.code >= 500:
                raise _Transient(msg) from None
            raise _Permanent(msg) from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise _Transient("%s: %s" % (type(reason).__name__, reason)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise _Transient("reply is not JSON: %r" % raw[:100]) from None

    def _check(self, reply, n):
        rewards = reply.get("rewards") if isinstance(reply, dict) else None
        if not isinstance(rewards, list):
            raise RewardError("remote reward %s: reply has no 'rewards' list: %r" % (self.url, str(reply)[:200]))
        if len(rewards) != n:
            raise RewardError("remote reward %s returned %d rewards for %d completions" % (self.url, len(rewards), n))
        out = []
        for r in rewards:
            if r is None:
                out.append(None)
            elif isinstance(r, (int, float)) and not isinstance(r, bool):
                out.append(float(r))
            else:
                out.append(math.nan)
        for i in reply.get("failed") or []:  # the server's way to send NaN through JSON
            if isinstance(i, int) and 0 <= i < n:
                out[i] = math.nan
        return out


class _Transient(Exception):
    pass


class _Permanent(Exception):
    pass
