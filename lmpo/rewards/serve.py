"""``lmpo serve-reward``: serve a reward function or a reward model over HTTP.

POST any path with ``{"prompts": [...], "completions": [...], "columns": {...}}`` (optionally
``"completion_ids"`` and ``"trainer_state"``) and get ``{"rewards": [...]}`` (plus ``"metrics"`` and
``"extra"`` when the function called ``log_metric`` / ``log_extra``); the function is called as TRL
calls reward functions; ``GET /health`` answers ``{"ok": true, "reward": NAME}``. Errors come
back as HTTP 400 (bad request) or 500 (the reward function raised) with ``{"error": ...}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .combine import RESERVED, RewardLogs, TrainerState, describe
from .errors import RewardError
from lmpo.rewards.combine import resolve_reward_funcs
from lmpo.rewards.reward_model import RewardModelScorer

log = logging.getLogger(__name__)
MAX_BODY = 256 << 20


def load_reward(spec: str):
    """(name, callable) for a reward spec or a reward-model directory."""
    if os.path.isdir(spec):
        return os.path.basename(os.path.normpath(spec)) or "reward_model", RewardModelScorer(spec)
    return resolve_reward_funcs([spec])[0]


def make_server(func, host: str = "127.0.0.1", port: int = 0, name: str | None = None):
    """A ThreadingHTTPServer serving ``func``; call ``serve_forever()`` on it.

    Calls to ``func`` are serialized with a lock (reward models are rarely thread-safe).
    """
    name = name or getattr(func, "__name__", "reward")
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, code, obj):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._send(200, {"ok": True, "reward": name})
            else:
                self._send(404, {"error": "POST a batch; GET /health"})

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
                if not 0 < length <= MAX_BODY:
                    raise ValueError("Content-Length must be 1..%d" % MAX_BODY)
                prompts, completions, ids, columns, state = _parse_request(json.loads(self.rfile.read(length)))
            except (ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": "bad request: %s" % e})
                return
            logs = RewardLogs(len(completions))
            try:
                with lock:
                    rewards = func(prompts=prompts, completions=completions, completion_ids=ids, **columns,
                                   trainer_state=state, log_metric=logs.log_metric, log_extra=logs.log_extra)
                rewards = [None if r is None else float(r) for r in rewards]
            except BaseException as e:  # noqa: BLE001 - reported to the client, sys.exit included
                log.exception("reward %s failed", name)
                self._send(500, {"error": describe(e)})
                return
            self._send(200, _reply(rewards, logs))

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def _parse_request(req: dict) -> tuple:
    """(prompts, completions, completion_ids, columns, trainer_state) of a request body; ValueError,
    KeyError or TypeError (HTTP 400) when it is malformed."""
    prompts, completions = req["prompts"], req["completions"]
    columns = req.get("columns") or {}
    ids, state = req.get("completion_ids"), req.get("trainer_state") or {}
    if not (isinstance(prompts, list) and isinstance(completions, list)
            and isinstance(columns, dict) and len(prompts) == len(completions)):
        raise ValueError("need lists 'prompts' and 'completions' of equal length and a dict 'columns'")
    clash = [k for k in columns if k in RESERVED]
    if clash:
        raise ValueError("column %r has the name of a reward-function keyword" % clash[0])
    state = TrainerState(**{k: state[k] for k in ("global_step", "max_steps", "epoch") if k in state})
    return prompts, completions, ids, columns, state


def _reply(rewards: list, logs: RewardLogs) -> dict:
    """The response body. JSON has no NaN: a non-finite reward is sent as null plus its index in "failed"."""
    failed = [i for i, r in enumerate(rewards) if r is not None and not math.isfinite(r)]
    for i in failed:
        rewards[i] = None
    reply = {"rewards": rewards, **({"failed": failed} if failed else {})}
    if logs.scalars:
        reply["metrics"] = logs.metrics()
    if logs.extra:
        reply["extra"] = json.loads(json.dumps(logs.extra, default=str))
    return reply


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lmpo serve-reward SPEC [--host H] [--port N]``."""
    p = argparse.ArgumentParser(prog="lmpo serve-reward", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="built-in reward name, module:function, path/to/file.py:function, "
                                "or a reward model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; default 8000)")
    args = p.parse_args(argv)
    try:
        name, func = load_reward(args.spec)
    except (RewardError, ImportError, OSError) as e:
        print("lmpo serve-reward: %s" % e, file=sys.stderr)
        return 2
    try:
        server = make_server(func, args.host, args.port, name)
    except OSError as e:
        print("lmpo serve-reward: cannot listen on %s:%d: %s" % (args.host, args.port, e), file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print("serving reward %s on http://%s:%d/" % (name, host, port), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
