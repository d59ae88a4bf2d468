"""The untrusted half of the code sandbox: runs the solution and answers calls with plain data.

The trusted harness (``_harness.py``) runs ``_main`` in a forked copy of itself (made before
it read the tests), or as ``python -I -c <this source> REQ_FD RESP_FD`` (a fresh interpreter,
after a crash), inside the sandbox, under the sandbox user id and resource limits. It
executes the candidate solution once, then serves requests, one JSON object per line:

    {"id": n, "op": "call",    "target": T, "args": [...], "kwargs": [[k, v], ...]}
    {"id": n, "op": "getattr", "target": T, "name": "attr"}

where T is ["name", "f"] (a top-level name of the solution) or ["h", 7] (a handle to an
object returned earlier). Replies are {"id": n, "ok": true, "value": V} or
{"id": n, "ok": false, "etype": "ValueError", "error": "..."}.

Everything this process sends is *data*: the harness rebuilds only builtin types from it
(no pickle), so nothing the solution does here can run code in the harness. The encoder
below is shared with the harness, which loads this file's source and skips ``_main``.
"""

import base64
import json

MAX_DEPTH = 200


class Unencodable(Exception):
    """The value is not plain data (the server then hands out a handle instead)."""


def encode(x, depth=0):
    """Plain data -> JSON-able tagged form. Exact builtin types only (no subclasses)."""
    if depth > MAX_DEPTH:
        raise Unencodable("nested too deeply")
    t = type(x)
    if x is None:
        return ["N"]
    if t is bool:
        return ["b", x]
    if t is int:
        return ["i", str(x)]
    if t is float:
        return ["f", float.hex(x)]
    if t is complex:
        return ["c", float.hex(x.real), float.hex(x.imag)]
    if t is str:
        return ["s", x]
    if t is bytes:
        return ["y", base64.b64encode(x).decode("ascii")]
    if t is list:
        return ["l", [encode(v, depth + 1) for v in x]]
    if t is tuple:
        return ["t", [encode(v, depth + 1) for v in x]]
    if t is dict:
        return ["d", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in x.items()]]
    if t is set:
        return ["S", [encode(v, depth + 1) for v in x]]
    if t is frozenset:
        return ["F", [encode(v, depth + 1) for v in x]]
    raise Unencodable(t.__name__)


def decode(v, depth=0):
    """Tagged form -> plain builtin data. Raises ValueError on anything malformed."""
    if depth > MAX_DEPTH or type(v) is not list or not v or type(v[0]) is not str:
        raise ValueError("malformed value")
    tag = v[0]
    if tag == "N":
        return None
    if tag == "b" and len(v) == 2 and type(v[1]) is bool:
        return v[1]
    if tag == "i" and len(v) == 2 and type(v[1]) is str:
        return int(v[1])
    if tag == "f" and len(v) == 2 and type(v[1]) is str:
        return float.fromhex(v[1])
    if tag == "c" and len(v) == 3:
        return complex(float.fromhex(v[1]), float.fromhex(v[2]))
    if tag == "s" and len(v) == 2 and type(v[1]) is str:
        return v[1]
    if tag == "y" and len(v) == 2 and type(v[1]) is str:
        return base64.b64decode(v[1].encode("ascii"), validate=True)
    if tag in ("l", "t", "S", "F") and len(v) == 2 and type(v[1]) is list:
        items = [decode(e, depth + 1) for e in v[1]]
        return {"l": list, "t": tuple, "S": set, "F": frozenset}[tag](items)
    if tag == "d" and len(v) == 2 and type(v[1]) is list:
        out = {}
        for pair in v[1]:
            if type(pair) is not list or len(pair) != 2:
                raise ValueError("malformed dict item")
            out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
        return out
    raise ValueError("unknown tag %r" % (tag,))


class _Session:  # pragma: no cover - runs inside the sandbox
    """The solution's namespace, the handles handed out for objects that are not plain data, and
    the reply pipe."""

    def __init__(self, resp_fd):
        import builtins

        self.resp_fd, self.handles = resp_fd, {}
        self.ns = {"__name__": "__solution__", "__builtins__": builtins}

    def reply(self, obj):
        import os

        data = (json.dumps(obj) + "\n").encode()
        view = memoryview(data)
        while view:
            n = os.write(self.resp_fd, view)
            view = view[n:]

    def to_wire(self, value):
        """Data if possible (numpy scalars/arrays become Python data), else a handle."""
        try:
            return encode(value)
        except (Unencodable, RecursionError):
            pass
        mod = type(value).__module__ or ""
        if mod.startswith("numpy"):
            try:
                return encode(value.tolist())
            except Exception:
                pass
        hid = len(self.handles) + 1
        self.handles[hid] = value
        return ["h", hid]

    def target_of(self, t):
        if t[0] == "name":
            return self.ns[t[1]]
        return self.handles[int(t[1])]

    def load(self, code: str) -> dict:
        """Run the solution once; the reply lists its top-level names (values, callables, handles)."""
        error = None
        try:
            exec(compile(code, "solution.py", "exec"), self.ns)
        except BaseException as e:  # SystemExit too: what was defined before it still counts
            error = "%s: %s" % (type(e).__name__, e)
        names = {}
        for k, v in list(self.ns.items()):
            if k.startswith("__") or type(v).__name__ == "module":
                continue
            try:
                names[k] = ["v", encode(v)]
            except (Unencodable, RecursionError):
                names[k] = ["c"] if callable(v) else ["o", self.to_wire(v)]
        return {"id": 0, "ok": True, "names": names, "error": error}

    def answer(self, req: dict) -> dict:
        """One call or getattr on a name or a handle; any exception comes back as data."""
        try:
            obj = self.target_of(req["target"])
            if req["op"] == "getattr":
                result = getattr(obj, req["name"])
            else:
                args = [decode(a) for a in req["args"]]
                kwargs = {k: decode(v) for k, v in req["kwargs"]}
                result = obj(*args, **kwargs)
            return {"id": req["id"], "ok": True, "value": self.to_wire(result)}
        except BaseException as e:
            try:
                msg = str(e)[:500]
            except BaseException:
                msg = "<unprintable>"
            return {"id": req["id"], "ok": False, "etype": type(e).__name__, "error": msg}


def _main(req_fd=None, resp_fd=None):  # pragma: no cover - runs inside the sandbox
    import os
    import sys

    if req_fd is None:
        req_fd, resp_fd = int(sys.argv[1]), int(sys.argv[2])
    sys.setrecursionlimit(10000)
    reader = os.fdopen(req_fd, "rb", buffering=1 << 16)
    session = _Session(resp_fd)
    session.reply(session.load(json.loads(reader.readline())["code"]))
    while True:
        line = reader.readline()
        if not line:
            os._exit(0)
        session.reply(session.answer(json.loads(line)))


if __name__ == "__main__":
    _main()
