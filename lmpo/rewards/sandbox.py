"""Run untrusted code against trusted tests, contained. Trainer side of the code sandbox.

One run = one fresh temporary directory + one process tree:

    trainer ──(stdin: job JSON)──► unshare --net --pid --mount --fork --kill-child --mount-proc
                                       └─ python -I -S _harness.py   (trusted, PID 1 of the namespace)
                                            └─ python -I -c _server.py (the solution, uid N, rlimits)

* ``--net``: a network namespace with only a downed loopback: no connection goes anywhere.
* ``--pid --fork --kill-child``: the harness is init of a fresh PID namespace. When it exits
  or is killed, the kernel kills every process left in the namespace, setsid'd daemons
  included; ``--kill-child`` kills it if ``unshare`` itself is killed.
* ``--mount --mount-proc``: private tmpfs mounts over the work dir, /tmp, /var/tmp and /dev/shm
  (size-capped, gone with the namespace) and a /proc that shows only the sandbox.
* when the trainer is root, the solution runs under a random unprivileged uid: host files
  are read-only to it, it cannot signal, ptrace or read the harness, and RLIMIT_NPROC counts
  only its own processes.
* rlimits on the solution: CPU time, address space, processes, open files, file size.
* the environment is replaced, not inherited.
* the trainer kills the whole process group after the wall limit (+ grace), and always
  removes the temporary directory.

Where namespaces are not permitted, the fallbacks are a user namespace (``unshare --user
--map-root-user``: same isolation minus the uid change) and then no namespace at all: a new
session, rlimits (RLIMIT_NPROC against fork bombs), and a harness that is a child subreaper
and kills every descendant it finds. The last one has NO network isolation and says so in
a warning, once.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_harness.py")
# The real interpreter, not a virtualenv's link to it: the venv may live under /tmp, which the
# sandbox covers with a private tmpfs, and the harness and solution need no site-packages (-I -S).
PYTHON = os.path.realpath(sys.executable)
_UNSHARE = ["--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc"]


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run (one completion against all its tests)."""

    cpu_s: float = 5.0          # CPU seconds per solution process (RLIMIT_CPU)
    wall_s: float = 10.0        # wall-clock seconds for all tests of one run
    test_timeout_s: float = 5.0  # wall-clock seconds per test unit
    mem_mb: int = 1024          # address space of the solution process (RLIMIT_AS)
    nproc: int = 32             # processes of the sandbox user (RLIMIT_NPROC)
    nofile: int = 64            # open files (RLIMIT_NOFILE)
    fsize_mb: int = 16          # largest file it may write (RLIMIT_FSIZE), its output file too
    tmpfs_mb: int = 64          # size of each private tmpfs (work dir, /tmp, ...)
    output_cap: int = 8192      # bytes of the solution's stdout/stderr kept in the result


@dataclass
class SandboxResult:
    passed: int
    total: int
    status: str  # "ok" (tests ran), "timeout" (killed by the trainer), "error" (sandbox trouble)
    seconds: float
    results: list = field(default_factory=list)  # [label, passed, why] per test unit
    output: str = ""
    init_error: str | None = None
    detail: str = ""

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


# ----------------------------------------------------------------------------- isolation


@dataclass(frozen=True)
class Isolation:
    name: str            # "namespaces+uid", "namespaces", "userns", "none"
    prefix: tuple        # command prefix before the interpreter
    mount_ns: bool
    drop_uid: bool


_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


def _candidates():
    unshare = shutil.which("unshare")
    out = []
    if unshare:
        if os.geteuid() == 0:
            out.append(Isolation("namespaces+uid", (unshare, *_UNSHARE), True, True))
            out.append(Isolation("namespaces", (unshare, *_UNSHARE), True, False))
        out.append(Isolation("userns", (unshare, "--user", "--map-root-user", *_UNSHARE), True, False))
    out.append(Isolation("none", (), False, False))
    return out


def isolation() -> Isolation:
    """The strongest isolation that works here, found once by running a real probe job."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            for cand in _candidates():
                r = _run(cand, "def f():\n    return 41 + 1\n", "assert f() == 42\n", None,
                         SandboxLimits(wall_s=20, test_timeout_s=20), None)
                if r.status == "ok" and r.passed == 1:
                    _isolation = cand
                    break
                log.info("sandbox isolation %r unavailable: %s %s", cand.name, r.status, r.detail)
            if _isolation.name == "none":
                warnings.warn(
                    "lmpo code sandbox: Linux namespaces are not permitted here (unshare failed), "
                    "so sandboxed code runs WITHOUT network isolation and without a PID namespace; "
                    "only rlimits, a new session and descendant-killing contain it. Run as root or "
                    "enable unprivileged user namespaces for full isolation.",
                    RuntimeWarning, stacklevel=2)
            elif not _isolation.drop_uid:
                log.warning("lmpo code sandbox: isolation %r (no separate uid for solutions)",
                            _isolation.name)
        return _isolation


# ----------------------------------------------------------------------------- running


def run_code(code: str, tests, *, entry_point: str | None = None,
             limits: SandboxLimits | None = None, tmp_root: str | None = None) -> SandboxResult:
    """Run ``code`` against ``tests`` (a test-file string or a list of test snippets)."""
    return _run(isolation(), code, tests, entry_point, limits or SandboxLimits(), tmp_root)


def _run(iso: Isolation, code, tests, entry_point, limits, tmp_root) -> SandboxResult:
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="lmpo-sbx-", dir=tmp_root)
    nonce = secrets.token_hex(16)
    uid = 10**6 + secrets.randbelow(2**31 - 10**6 - 2) if iso.drop_uid else None
    job = {"nonce": nonce, "code": code, "tests": tests, "entry_point": entry_point,
           "limits": asdict(limits), "workdir": workdir, "mount_ns": iso.mount_ns, "uid": uid}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    cmd = [*iso.prefix, PYTHON, "-I", "-S", HARNESS]
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=workdir, env=env,
                                start_new_session=True, close_fds=True)
    except OSError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        return SandboxResult(0, 0, "error", time.monotonic() - t0, detail="spawn failed: %s" % e)
    try:
        try:
            out, err = proc.communicate(json.dumps(job).encode(), timeout=limits.wall_s + 2.0)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            proc.communicate()
            return SandboxResult(0, 0, "timeout", time.monotonic() - t0,
                                 detail="killed after %.1fs wall" % (limits.wall_s + 2.0))
        return _parse(out, err, nonce, proc.returncode, time.monotonic() - t0)
    finally:
        _killpg(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _killpg(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _parse(out: bytes, err: bytes, nonce: str, rc, seconds) -> SandboxResult:
    for line in out.decode("utf-8", "replace").splitlines():
        head, _, body = line.partition(" ")
        if head == nonce:
            try:
                r = json.loads(body)
                res = SandboxResult(int(r["passed"]), int(r["total"]), "ok", seconds,
                                    r.get("results", []), r.get("output", ""), r.get("init_error"))
                if r.get("harness_error"):
                    res.status, res.detail = "error", r["harness_error"]
                return res
            except (ValueError, KeyError, TypeError):
                break
    tail = err.decode("utf-8", "replace")[-500:]
    return SandboxResult(0, 0, "error", seconds, detail="no result (rc=%s): %s" % (rc, tail))
