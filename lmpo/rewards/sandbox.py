"""Run untrusted code against trusted tests, contained. Trainer side of the code sandbox.

One run = one completion against all its tests, in its own namespaces and memory cgroup:

    trainer ──(socketpair: header + 2 pipe ends)──► zygote (python -I -S _harness.py zygote, root, started once)
       │                                                └─ fork + unshare(mount, PID, net, IPC, UTS) ──► pidfd to the trainer
       │── job on a pipe (nonce, code, tests) ─────────────── └─ harness: PID 1, new root, runs the tests
       ◄── "<nonce> <json>" on a pipe ──────────────────────────── └─ server: the solution; uid N, rlimits, memory cgroup

Guarantees (each is checked by the hostile corpus, tests/hostile/):

* the tests run in the harness, the solution in the server; only plain data crosses, and the
  solution's names cannot replace the builtins or the helpers the tests call;
* the solution's filesystem is a fresh tmpfs root: read-only system dirs (/usr, /lib*, /bin,
  /sbin) and the interpreter's own tree, /dev/{null,zero,full,random,urandom}, a /proc of its
  PID namespace that hides other users' processes, and writable /work, /tmp, /dev/shm of at
  most ``tmpfs_mb``. No dataset, checkout, home, cache or socket file of the host is in it;
* no network (a new network namespace, loopback down), no IPC with the host (a new IPC
  namespace: SysV and POSIX IPC objects live and die with it), no signals or ptrace beyond its
  own processes (a new PID namespace, a random unprivileged uid, a non-dumpable harness);
* ``mem_mb`` bounds the memory of all the solution's processes together (a memory cgroup per
  run, swap included where the kernel accounts it), besides per-process rlimits;
* nothing is left behind: the namespace's processes die with its PID 1, its IPC objects and
  mounts with the namespaces, the cgroup and the empty work dir are removed by the trainer.

The sandbox needs root (in a container is fine): namespaces, the uid change and the memory
cgroup need it. Where any of these cannot be had, :func:`check` raises
:class:`SandboxUnavailable` saying which; nothing runs with weaker isolation.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from lmpo.errors import SandboxUnavailable  # noqa: F401 (its home is lmpo.errors; imported from here too)

log = logging.getLogger(__name__)

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_harness.py")
# The real interpreter, not a virtualenv's link to it: the sandbox binds the interpreter's own
# tree into its root and runs without site-packages (-I -S).
PYTHON = os.path.realpath(sys.executable)
SANDBOX_UID_MIN = 10**6
OUTPUT_MAX = 16 << 20  # bytes read from the harness pipe at most (result line + test prints)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run (one completion against all its tests)."""

    cpu_s: float = 5.0          # CPU seconds per solution process (RLIMIT_CPU)
    wall_s: float = 10.0        # wall-clock seconds for all tests of one run
    test_timeout_s: float = 5.0  # wall-clock seconds per test unit
    mem_mb: int = 1024          # memory of all the run's processes together (cgroup); also RLIMIT_AS of each
    nproc: int = 32             # processes of the sandbox user (RLIMIT_NPROC; the uid is unique per run)
    nofile: int = 64            # open files (RLIMIT_NOFILE)
    fsize_mb: int = 16          # largest file it may write (RLIMIT_FSIZE), its output file too
    tmpfs_mb: int = 64          # size of the sandbox's root tmpfs (/work, /tmp, /dev/shm together)
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
    peak_mb: float | None = None  # peak memory of the run's cgroup (all solution processes)

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


# ----------------------------------------------------------------------------- memory cgroup


class MemoryCgroups:
    """Per-run child cgroups of the trainer's own memory cgroup (cgroup v1 or v2)."""

    def __init__(self):
        v1_path = v2_path = None
        with open("/proc/self/cgroup") as f:
            for line in f:
                hid, ctrls, path = line.rstrip("\n").split(":", 2)
                if hid == "0" and ctrls == "":
                    v2_path = path
                elif "memory" in ctrls.split(","):
                    v1_path = path
        mounts = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields, after = pre.split(), post.split()
                mounts.append((fields[3], fields[4], after[0], after[2].split(",") if len(after) > 2 else []))
        base = None
        if v1_path is not None:
            for root, mnt, fstype, opts in mounts:
                if fstype == "cgroup" and "memory" in opts:
                    base, self.v2 = mnt + _relative(v1_path, root), False
                    break
        if base is None and v2_path is not None:
            for root, mnt, fstype, _ in mounts:
                if fstype == "cgroup2":
                    base, self.v2 = mnt + _relative(v2_path, root), True
                    break
        if base is None or not os.path.isdir(base):
            raise SandboxUnavailable("no memory cgroup found (/proc/self/cgroup and /proc/self/mountinfo "
                                     "name no memory controller); the sandbox needs one to bound a "
                                     "completion's memory")
        self.base = base
        if self.v2:
            with open(os.path.join(base, "cgroup.controllers")) as f:
                if "memory" not in f.read().split():
                    raise SandboxUnavailable("cgroup v2 at %s has no memory controller" % base)
            try:
                with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory")
            except OSError as e:  # "no internal processes": try siblings under the parent
                parent = os.path.dirname(base)
                try:
                    with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                        ok = "memory" in f.read().split() and os.access(parent, os.W_OK)
                except OSError:
                    ok = False
                if not ok:
                    raise SandboxUnavailable(
                        "cannot enable the memory controller for child cgroups of %s (%s), nor "
                        "use its parent; run the trainer in a cgroup delegated to it" % (base, e)) from None
                self.base = parent

    def create(self, name: str, limit_mb: int) -> str:
        path = os.path.join(self.base, name)
        os.mkdir(path)
        limit = str(limit_mb << 20)
        try:
            if self.v2:
                _write(path, "memory.max", limit)
                _write(path, "memory.swap.max", "0", optional=True)
            else:
                _write(path, "memory.limit_in_bytes", limit)
                _write(path, "memory.memsw.limit_in_bytes", limit, optional=True)
        except OSError:
            self.remove(path)
            raise
        return path

    def peak_mb(self, path: str):
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                with open(os.path.join(path, name)) as f:
                    return int(f.read()) / (1 << 20)
            except (OSError, ValueError):
                pass
        return None

    @staticmethod
    def remove(path: str) -> bool:
        for _ in range(200):  # busy only while the killed processes finish exiting
            try:
                os.rmdir(path)
                return True
            except FileNotFoundError:
                return True
            except OSError as e:
                if e.errno != errno.EBUSY:
                    break
                time.sleep(0.01)
        log.warning("code sandbox: could not remove cgroup %s", path)
        return False


def _relative(path, mount_root):
    if mount_root != "/" and path.startswith(mount_root):
        path = path[len(mount_root):]
    return path if path.startswith("/") else "/" + path


def _write(cg, name, value, optional=False):
    try:
        with open(os.path.join(cg, name), "w") as f:
            f.write(value)
    except FileNotFoundError:
        if not optional:
            raise


# ----------------------------------------------------------------------------- zygote


class _Zygote:
    """The fork server: started once, forks a fresh sandbox per run (saves two interpreter starts)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.proc = None
        self.sock = None

    def _start(self):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        self.proc = subprocess.Popen([PYTHON, "-I", "-S", HARNESS, "zygote"], stdin=theirs,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, cwd="/", close_fds=True, start_new_session=True)
        theirs.close()
        self.sock = ours

    def spawn(self, header: dict, fds: list) -> tuple:
        """-> (pid, pidfd) of the sandbox's outermost process."""
        with self.lock:
            for attempt in range(2):
                if self.proc is None or self.proc.poll() is not None:
                    self._start()
                try:
                    socket.send_fds(self.sock, [json.dumps(header).encode()], fds)
                    msg, got, _, _ = socket.recv_fds(self.sock, 1 << 16, 1)
                except OSError:
                    if attempt:
                        raise
                    self.proc = None  # it died: start another
                    continue
                reply = json.loads(msg or b'{"error": "zygote exited"}')
                if "error" in reply:
                    for fd in got:
                        os.close(fd)
                    raise OSError(reply["error"])
                return reply["pid"], got[0]


    def forget(self):
        """In a forked child of the trainer: the parent's zygote and lock are not ours to use."""
        self.lock = threading.Lock()
        if self.sock is not None:
            self.sock.close()
        self.proc = self.sock = None


_zygote = _Zygote()
os.register_at_fork(after_in_child=_zygote.forget)
_cgroups: MemoryCgroups | None = None
_ready: bool | SandboxUnavailable | None = None
_check_lock = threading.Lock()


def check() -> None:
    """Make sure the sandbox can give its guarantees here (once per process): raise
    :class:`SandboxUnavailable` naming what is missing, else return. Runs a real probe job."""
    global _ready, _cgroups
    with _check_lock:
        if _ready is None:
            try:
                if os.geteuid() != 0:
                    raise SandboxUnavailable(
                        "the code sandbox needs root (uid 0, e.g. in a container): it creates "
                        "namespaces, a memory cgroup and a separate uid per run; this process has "
                        "uid %d" % os.geteuid())
                _cgroups = MemoryCgroups()
                probe = MemoryCgroups.remove(_cgroups.create("lmpo-sbx-probe-" + secrets.token_hex(4), 64))
                if not probe:
                    raise SandboxUnavailable("cannot remove a memory cgroup under %s" % _cgroups.base)
                r = _run("def f():\n    return 41 + 1\n", "assert f() == 42\n", None,
                         SandboxLimits(wall_s=30, test_timeout_s=30), None)
                if r.status != "ok" or r.passed != 1:
                    raise SandboxUnavailable("the sandbox's probe job failed (%s): %s"
                                             % (r.status, r.detail or r.results))
                _ready = True
            except SandboxUnavailable as e:
                _ready = e
            except OSError as e:
                _ready = SandboxUnavailable("code sandbox setup failed: %s" % e)
        if _ready is not True:
            raise _ready


# ----------------------------------------------------------------------------- running


def run_code(code: str, tests, *, entry_point: str | None = None,
             limits: SandboxLimits | None = None, tmp_root: str | None = None) -> SandboxResult:
    """Run ``code`` against ``tests`` (a test-file string or a list of test snippets).
    Raises :class:`SandboxUnavailable` where the sandbox's guarantees cannot be given."""
    check()
    return _run(code, tests, entry_point, limits or SandboxLimits(), tmp_root)


def _run(code, tests, entry_point, limits, tmp_root) -> SandboxResult:
    t0 = time.monotonic()
    nonce = secrets.token_hex(16)
    uid = SANDBOX_UID_MIN + secrets.randbelow(2**31 - SANDBOX_UID_MIN - 2)
    workdir = tempfile.mkdtemp(prefix="lmpo-sbx-", dir=tmp_root)  # the new root's mount point
    cg = pidfd = None
    pipes = []
    try:
        cg = _cgroups.create("lmpo-sbx-" + nonce[:16], limits.mem_mb)
        job_r, job_w = os.pipe()
        out_r, out_w = os.pipe()
        pipes = [job_w, out_r]
        header = {"workdir": workdir, "uid": uid, "limits": asdict(limits),
                  "cgroup_procs": os.path.join(cg, "cgroup.procs")}
        try:
            _, pidfd = _zygote.spawn(header, [job_r, out_w])
        finally:
            os.close(job_r)
            os.close(out_w)
        job = json.dumps({"nonce": nonce, "code": code, "tests": tests, "entry_point": entry_point})
        out, timed_out = _exchange(job.encode(), pipes, t0 + limits.wall_s + 3.0)
        if timed_out:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        _wait_exit(pidfd)
        res = _parse(out, nonce, time.monotonic() - t0)
        if timed_out:
            res = SandboxResult(0, 0, "timeout", time.monotonic() - t0,
                                detail="killed after %.1fs wall" % (limits.wall_s + 3.0))
        res.peak_mb = _cgroups.peak_mb(cg)
        return res
    except OSError as e:
        return SandboxResult(0, 0, "error", time.monotonic() - t0, detail="sandbox failed: %s" % e)
    finally:
        for fd in pipes:
            os.close(fd)
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_exit(pidfd)
            os.close(pidfd)
        if cg is not None:
            MemoryCgroups.remove(cg)
        os.rmdir(workdir)


def _exchange(job: bytes, pipes: list, deadline: float):
    """Write the job, read the harness's output until EOF or the deadline. -> (bytes, timed_out).
    ``pipes`` is [job_w, out_r]; job_w is closed (and dropped from the list) once written."""
    job_w, out_r = pipes
    os.set_blocking(job_w, False)
    data, out = memoryview(job), bytearray()
    poller = select.poll()
    poller.register(out_r, select.POLLIN)
    poller.register(job_w, select.POLLOUT)
    writing = True
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), True
        for fd, ev in poller.poll(left * 1000):
            if fd == job_w:
                try:
                    data = data[os.write(job_w, data[:1 << 16]):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    data = data[:0]
                if not data and writing:
                    poller.unregister(job_w)
                    os.close(job_w)
                    pipes.remove(job_w)
                    writing = False
            else:
                chunk = os.read(out_r, 1 << 16)
                if not chunk:
                    return bytes(out), False
                out += chunk
                if len(out) > OUTPUT_MAX:  # keep the tail: the result line comes last
                    del out[:len(out) - OUTPUT_MAX]


def _wait_exit(pidfd, timeout_s=10.0):
    """Wait until the sandbox's outermost process has exited; it waits for its PID 1, whose
    exit takes every process of the namespace with it."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    p.poll(timeout_s * 1000)


def _parse(out: bytes, nonce: str, seconds) -> SandboxResult:
    text = out.decode("utf-8", "replace")
    for line in text.splitlines():
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
    tail = "\n".join(ln for ln in text.splitlines() if not ln.startswith(nonce))[-500:]
    return SandboxResult(0, 0, "error", seconds, detail="no result: %s" % tail)
