"""The trusted half of the code sandbox: makes the sandbox and runs the tests, never the solution.

``python -I -S _harness.py zygote`` is a fork server started once by ``lmpo.rewards.sandbox``
(root, host namespaces, scrubbed environment, stdin = a unix socketpair). Per run the trainer
sends it a header (work dir, sandbox uid, limits, memory cgroup; never the tests) and two pipe
ends; it forks, the child ``unshare``s new mount, PID, network, IPC and UTS namespaces and
forks the harness, PID 1 of the new PID namespace, and the zygote hands the trainer a pidfd
of that child. The harness:

1. builds a new root (``_make_root``): a size-capped tmpfs with read-only binds of the system
   dirs and the interpreter, a fresh /work, /tmp and /dev/shm, five device nodes and a /proc
   of the new PID namespace (``hidepid=2``); ``pivot_root`` into it and detach the old root:
   no path in the namespace leads to the host's files any more;
2. forks the solution's server process *before reading the job* (so the tests are not in its
   memory): it joins the run's memory cgroup, takes rlimits and ``no_new_privs``, drops to
   the run's uid and serves the solution (``_server.py``);
3. reads the job (nonce, code, tests) on stdin and runs each test unit here, in a fresh
   namespace that holds the solution's names as remote handles, and prints one line,
   ``<nonce> <json result>``, on the pipe the trainer reads.

The solution never executes in this process: when a test calls a solution function, the
arguments go to the server and *plain data* comes back (rebuilt from JSON, never unpickled).
So a solution that calls ``sys.exit(0)`` or ``os._exit``, prints "PASSED", redefines builtins
or the test helpers, or monkeypatches anything, changes only its own process: the verdict of
each unit is the outcome of the test code running here. A server that dies or hangs is killed
and a fresh interpreter is exec'd for the next unit.
"""

import ast
import builtins
import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import time
import types

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
DEVICES = ("null", "zero", "full", "random", "urandom")
MAX_LINE = 32 << 20

_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _prctl(option, arg):
    return _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0)


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           "mount %s on %s" % (fstype or source, target))


def _pivot_root(new, old):
    fn = getattr(_libc, "pivot_root", None)
    if fn is not None:
        _check(fn(new.encode(), old.encode()), "pivot_root")
    else:
        nr = SYS_PIVOT_ROOT[os.uname().machine]
        _check(_libc.syscall(ctypes.c_long(nr), new.encode(), old.encode()), "pivot_root")


# ----------------------------------------------------------------------------- zygote


def zygote(sock):
    """Fork a fresh sandbox per request; never read a job (only headers pass through here)."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the namespace parents are reaped by the kernel
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
        except OSError:
            return
        if not msg:
            return
        try:
            header = json.loads(msg)
            pid = os.fork()
            if pid == 0:
                sock.close()
                _namespace_parent(header, *fds)  # never returns
            pidfd = os.pidfd_open(pid)
            socket.send_fds(sock, [json.dumps({"pid": pid}).encode()], [pidfd])
            os.close(pidfd)
        except Exception as e:  # noqa: BLE001 - tell the trainer, keep serving
            sock.send(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}).encode())
        finally:
            for fd in fds:
                os.close(fd)


def _namespace_parent(header, job_fd, out_fd):
    """Child of the zygote: enter new namespaces, fork the harness (PID 1), wait for it."""
    code = 127
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS),
               "unshare")
        pid = os.fork()
        if pid == 0:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # killing this parent kills the namespace
            os.dup2(job_fd, 0)
            os.dup2(out_fd, 1)
            os.dup2(out_fd, 2)
            os.closerange(3, 65536)
            os._exit(harness(header))
        os.close(job_fd)
        os.close(out_fd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status) & 0xFF
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(out_fd, ("sandbox setup failed: %s: %s\n" % (type(e).__name__, e)).encode())
        except OSError:
            pass
    os._exit(code)


# ----------------------------------------------------------------------------- filesystem


def _make_root(header):
    """A new root for the whole namespace; the host's files become unreachable."""
    root, uid = header["workdir"], header["uid"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV,
           "size=%dm,mode=755" % header["limits"]["tmpfs_mb"])
    ro = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV

    def bind(src, read_only=True):
        dst = root + src
        if os.path.isdir(src):
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            open(dst, "w").close()
        _mount(src, dst, None, MS_BIND | MS_REC)
        if read_only:
            _mount(None, dst, None, ro)

    bound = []
    for d in SYSTEM_DIRS:
        if os.path.islink(d):
            os.symlink(os.readlink(d), root + d)
        elif os.path.isdir(d):
            bind(d)
            bound.append(d)
    prefixes = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    for p in sorted(prefixes):  # the interpreter's own tree when it lives outside the system dirs
        if not any(p == b or p.startswith(b + "/") for b in bound):
            bind(p)
            bound.append(p)
    if os.path.isfile("/etc/ld.so.cache"):
        bind("/etc/ld.so.cache")
    for name in DEVICES:
        bind("/dev/" + name, read_only=False)
    os.symlink("/proc/self/fd", root + "/dev/fd")
    for d, mode in (("/tmp", 0o1777), ("/dev/shm", 0o1777), ("/work", 0o700), ("/proc", 0o555)):
        os.makedirs(root + d, exist_ok=True)
        os.chmod(root + d, mode)
    os.chown(root + "/work", uid, uid)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=2")
    os.mkdir(root + "/.old")
    _pivot_root(root, root + "/.old")
    os.chdir("/")
    _check(_libc.umount2(b"/.old", MNT_DETACH), "umount old root")
    os.rmdir("/.old")
    os.chdir("/work")


# ----------------------------------------------------------------------------- tests


def split_tests(tests, entry_point):
    """-> (preamble code object, [(label, code object)]). Tests are trusted dataset text.

    A test file's top-level ``assert``s and ``test_*`` functions are the units; without them
    a ``check(candidate)`` function is the one unit. Top-level calls of ``check(...)`` (the
    trailing ``check(entry_point)`` of HumanEval-style files) are dropped from the preamble,
    so the check runs once, as the unit."""
    if isinstance(tests, list):
        units = [("test[%d]" % i, compile(t, "test[%d]" % i, "exec")) for i, t in enumerate(tests)]
        return compile("", "preamble", "exec"), units
    tree = ast.parse(tests, "tests")
    preamble, units, check = [], [], None
    for node in tree.body:
        if isinstance(node, ast.Assert):
            units.append(("line %d: %s" % (node.lineno, ast.unparse(node)[:80]), node))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            preamble.append(node)
            units.append((node.name + "()", ast.parse("%s()" % node.name).body[0]))
        elif (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
              and isinstance(node.value.func, ast.Name) and node.value.func.id == "check"):
            continue
        else:
            if isinstance(node, ast.FunctionDef) and node.name == "check":
                check = node
            preamble.append(node)
    if not units and check is not None:
        units.append(("check(%s)" % (entry_point or "candidate"), ast.parse("check(__candidate__)").body[0]))
    mod = lambda body: compile(ast.Module(body=body, type_ignores=[]), "tests", "exec")  # noqa: E731
    return mod(preamble), [(label, mod([n])) for label, n in units]


# ----------------------------------------------------------------------------- solution process


class Deadline(BaseException):
    """The per-test deadline passed (BaseException so a test's `except Exception` won't eat it)."""


class ProtocolError(Exception):
    """The solution process sent something that is not a well-formed reply."""


class RemoteError(Exception):
    """The solution raised an exception type that is not a builtin one."""


class SolutionProcess:
    """The untrusted server process and its pipes. Everything it sends is checked data."""

    def __init__(self, header, cgroup_fd):
        self.header = header
        self.cgroup_fd = cgroup_fd
        self.proc_pid = None
        self.ready = False  # the solution's code has run in the current server
        self.names = {}
        self.init_error = None
        self.next_id = 1
        self.buf = b""
        self.out_fd = os.open("/.output", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def spawn(self, fresh):
        """Fork the server. ``fresh=False`` (only before the job is read) runs the server in
        the forked copy of this interpreter; ``fresh=True`` execs a new interpreter, so no
        memory of this process (the tests) reaches the solution."""
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        null_fd = os.open("/dev/null", os.O_RDONLY)
        limits, uid = self.header["limits"], self.header["uid"]
        pid = os.fork()
        if pid == 0:  # child: cgroup, limits, user, then the server
            try:
                os.setsid()
                os.write(self.cgroup_fd, b"0")  # join the run's memory cgroup (children inherit it)
                high = [os.dup(fd) for fd in (null_fd, self.out_fd, self.out_fd, req_r, resp_w)]
                for target, fd in enumerate(high):  # high copies first: no fd clobbers another
                    os.dup2(fd, target, inheritable=True)
                os.closerange(5, 65536)
                for sig in (signal.SIGALRM, signal.SIGPIPE, signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "no_new_privs")
                _apply_limits(limits, solution=True)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                os.environ.clear()
                os.environ.update({"PATH": "/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp",
                                   "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
                                   "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1"})
                if fresh:
                    os.execve(sys.executable, [sys.executable, "-I", "-u", "-c", SERVER_SRC, "3", "4"],
                              dict(os.environ))
                _prctl(PR_SET_DUMPABLE, 1)  # its own /proc/self, as after an exec
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                _codec["_main"](3, 4)
            finally:
                os._exit(127)
        for fd in (req_r, resp_w, null_fd):
            os.close(fd)
        self.proc_pid, self.req_w, self.resp_r, self.buf = pid, req_w, resp_r, b""

    def init(self, code):
        self._send({"id": 0, "op": "init", "code": code})
        reply = self._recv(0)
        self.names, self.init_error = reply.get("names"), str(reply.get("error") or "")[:300]
        if type(self.names) is not dict:
            raise ProtocolError("bad init reply")
        self.ready = True

    def alive(self):
        return self.proc_pid is not None

    def kill(self):
        """Kill the solution process and everything it started (setsid'd daemons too)."""
        if self.proc_pid is None:
            return
        for fd in (self.req_w, self.resp_r):
            try:
                os.close(fd)
            except OSError:
                pass
        _kill_all_but_me()
        self.proc_pid, self.ready = None, False

    def _send(self, obj):
        data = memoryview((json.dumps(obj) + "\n").encode())
        while data:
            n = os.write(self.req_w, data)
            data = data[n:]

    def _recv(self, want_id):
        while b"\n" not in self.buf:
            select.select([self.resp_r], [], [])
            chunk = os.read(self.resp_r, 1 << 16)
            if not chunk:
                raise EOFError("solution process exited")
            self.buf += chunk
            if len(self.buf) > MAX_LINE:
                raise ProtocolError("reply too large")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError:
            raise ProtocolError("garbled reply") from None
        if type(reply) is not dict or reply.get("id") != want_id:
            raise ProtocolError("reply out of order")
        return reply

    def request(self, op, target, **kw):
        rid = self.next_id
        self.next_id += 1
        self._send(dict(id=rid, op=op, target=target, **kw))
        reply = self._recv(rid)
        if reply.get("ok") is True:
            try:
                return self.from_wire(reply.get("value"))
            except (ValueError, TypeError, RecursionError) as e:
                raise ProtocolError("malformed value: %s" % e) from None
        etype = getattr(builtins, str(reply.get("etype")), None)
        msg = str(reply.get("error"))[:500]
        if isinstance(etype, type) and issubclass(etype, Exception) and not issubclass(etype, Deadline):
            raise etype(msg)
        raise RemoteError("%s: %s" % (str(reply.get("etype"))[:100], msg))

    def from_wire(self, v):
        if type(v) is list and len(v) == 2 and v[0] == "h" and type(v[1]) is int:
            return RemoteObject(self, ["h", v[1]])
        return decode(v)


def _to_wire_arg(x):
    try:
        return encode(x)
    except Unencodable as e:
        raise TypeError("cannot pass %s to the solution (only plain data crosses)" % e) from None


class RemoteObject:
    """A function or object living in the solution process. Calls cross as plain data.

    It has no trusted truth value or equality: ``==`` is identity and ``bool()`` raises, so an
    object built to compare equal to everything cannot make an assertion pass.
    """

    __slots__ = ("_proc", "_target")

    def __init__(self, proc, target):
        object.__setattr__(self, "_proc", proc)
        object.__setattr__(self, "_target", target)

    def __call__(self, *args, **kwargs):
        return self._proc.request("call", self._target, args=[_to_wire_arg(a) for a in args],
                                  kwargs=[[str(k), _to_wire_arg(v)] for k, v in kwargs.items()])

    def __getattr__(self, name):
        return self._proc.request("getattr", self._target, name=name)

    def __bool__(self):
        raise TypeError("a solution object has no trusted truth value; return plain data")

    def __repr__(self):
        return "<solution object %s>" % (self._target,)


# ----------------------------------------------------------------------------- processes


def _apply_limits(limits, solution):
    mb = 1 << 20
    cpu = int(limits["cpu_s"]) if solution else int(limits["wall_s"]) + 5
    pairs = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_CORE, 0)]
    if solution:
        pairs += [(resource.RLIMIT_AS, limits["mem_mb"] * mb),
                  (resource.RLIMIT_NOFILE, limits["nofile"]),
                  (resource.RLIMIT_FSIZE, limits["fsize_mb"] * mb),
                  (resource.RLIMIT_NPROC, limits["nproc"])]
    for res, val in pairs:
        resource.setrlimit(res, (val, val))


def _kill_all_but_me():
    """As init of our PID namespace, kill(-1) reaches every other process in it and nothing outside."""
    for _ in range(500):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while True:  # reap
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
        time.sleep(0.002)


# ----------------------------------------------------------------------------- main


def _alarm(signum, frame):
    raise Deadline("test timed out")


def run_units(job, header, proc):
    limits = header["limits"]
    preamble, units = split_tests(job["tests"], job.get("entry_point"))
    t_end = time.monotonic() + limits["wall_s"]
    per_test = limits["test_timeout_s"]
    results, init_error = [], None
    signal.signal(signal.SIGALRM, _alarm)
    for label, code in units:
        left = t_end - time.monotonic()
        if left <= 0.01:
            results.append([label, False, "wall time limit reached"])
            continue
        signal.setitimer(signal.ITIMER_REAL, min(per_test, left))
        ok, why = False, ""
        try:
            if not proc.alive():
                proc.spawn(fresh=True)
            if not proc.ready:
                proc.init(job["code"])
                init_error = init_error or proc.init_error
            ns = _namespace(proc, job.get("entry_point"))
            exec(preamble, ns)
            exec(code, ns)
            ok = True
        except Deadline:
            why = "timeout"
            proc.kill()
        except (EOFError, OSError, ProtocolError) as e:  # the solution process broke down
            why = "%s: %s" % (type(e).__name__, e)
            proc.kill()
        except BaseException as e:  # the test failed (AssertionError or an error it hit)
            why = "%s: %s" % (type(e).__name__, str(e)[:200])
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        results.append([label, ok, why[:300]])
    proc.kill()
    return results, init_error


def _namespace(proc, entry_point):
    """The test namespace: the solution's names as plain data or remote handles, except names of
    builtins (a solution's ``sorted`` or ``abs`` must not replace the one the tests call; the
    entry point is the exception), then the tests' own preamble on top (its helpers win)."""
    ns = {"__name__": "__tests__", "__builtins__": builtins}
    module = types.ModuleType("solution")
    last_callable = None
    for name, kind in proc.names.items():
        if type(name) is not str or type(kind) is not list or not kind:
            continue
        if kind[0] == "v":
            value = decode(kind[1])
        elif kind[0] == "o":
            value = proc.from_wire(kind[1])
        else:
            value = RemoteObject(proc, ["name", name])
            last_callable = value
        setattr(module, name, value)
        if name == entry_point or not hasattr(builtins, name):
            ns[name] = value
    sys.modules["solution"] = module
    ns["__candidate__"] = getattr(module, entry_point, last_callable) if entry_point else last_callable
    return ns


def harness(header):
    """PID 1 of the sandbox's namespaces: build the root, start the server, run the job."""
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace / /proc/<pid>/{mem,fd,environ} from the sandbox
    result_fd = os.dup(1)  # the result goes here; prints of the test code go to stderr
    os.dup2(2, 1)
    out = {"passed": 0, "total": 0, "results": [], "output": "", "init_error": None}
    nonce = ""
    try:
        _apply_limits(header["limits"], solution=False)
        cgroup_fd = os.open(header["cgroup_procs"], os.O_WRONLY)
        _make_root(header)
        proc = SolutionProcess(header, cgroup_fd)
        proc.spawn(fresh=False)  # before the job (and its tests) is read
        raw = b""
        while True:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                break
            raw += chunk
        job = json.loads(raw)
        nonce = job.pop("nonce")
        results, out["init_error"] = run_units(job, header, proc)
        out["results"] = results
        out["total"] = len(results)
        out["passed"] = sum(1 for r in results if r[1])
        os.lseek(proc.out_fd, 0, os.SEEK_SET)
        with open("/.output", "rb") as f:
            out["output"] = f.read(header["limits"]["output_cap"]).decode("utf-8", "replace")
    except BaseException as e:  # report harness trouble instead of dying silently
        out["harness_error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        _kill_all_but_me()
    os.write(result_fd, (nonce + " " + json.dumps(out) + "\n").encode())
    return 0


_codec = {}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_server.py")) as _f:
    SERVER_SRC = _f.read()  # read once, by the zygote, before any sandbox exists
exec(compile(SERVER_SRC, "_server.py", "exec"), _codec)
encode, decode, Unencodable = _codec["encode"], _codec["decode"], _codec["Unencodable"]

if __name__ == "__main__":
    if sys.argv[1:] == ["zygote"]:
        zygote(socket.socket(fileno=0))
    sys.exit(0)
