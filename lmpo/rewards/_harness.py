"""The trusted half of the code sandbox: runs the tests, never the solution.

Started by ``lmpo.rewards.sandbox`` as ``[unshare ...] python -I -S _harness.py`` with the job
(JSON) on stdin. It prints one line, ``<nonce> <json result>``, on stdout. The nonce is fresh
per run and only the trainer and this process know it.

The solution never executes in this process. It runs in a separate process (``_server.py``)
under another user id (when we are root) and with resource limits; this process executes
the tests and, when a test calls a solution function, sends the arguments to that process and
gets back *plain data* (ints, strings, lists, ... rebuilt here from JSON, never unpickled).
So a solution that calls ``sys.exit(0)`` or ``os._exit``, prints "PASSED", redefines
builtins or the test helpers, or monkeypatches anything, only changes its own process: the
verdict of each test is the outcome of the test code running here. Each test unit (top-level
``assert``, ``test_*`` function, or ``check(candidate)``) runs in a fresh namespace with a
per-unit deadline; a solution process that dies or hangs is killed and restarted for the
next unit.
"""

import ast
import builtins
import ctypes
import json
import os
import resource
import select
import signal
import sys
import time
import types

PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
MS_NOSUID, MS_NODEV, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 4096, 16384, 1 << 18
MAX_LINE = 32 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_notes = []


def _prctl(option, arg):
    return _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0)


def _mount(source, target, fstype, flags, data):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    rc = _libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, "mount %s on %s: %s" % (fstype or source, target, os.strerror(err)))


# ----------------------------------------------------------------------------- filesystem


def _setup_filesystem(job):
    """Private tmpfs over the world-writable dirs and the work dir (only in our mount ns)."""
    workdir, size = job["workdir"], "%dm" % job["limits"]["tmpfs_mb"]
    if not job["mount_ns"]:
        os.chdir(workdir)
        return
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(d) and not os.path.islink(d) and os.stat(d).st_mode & 0o002:
            try:
                _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=%s,mode=1777" % size)
            except OSError as e:
                _notes.append(str(e))
    os.makedirs(workdir, mode=0o755, exist_ok=True)
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, "size=%s,mode=1777" % size)
    os.chdir(workdir)
    if job.get("uid") is not None:
        _expose_python()


def _expose_python():
    """Let the sandbox user reach the interpreter when it lives under a private dir (/root).

    For every ancestor of the interpreter's prefixes that others cannot traverse, mount a
    tmpfs (mode 755) over it in our mount namespace and bind the one child we need back in.
    The host is unchanged; the rest of that private dir stays invisible to the sandbox.
    """
    needed = {os.path.realpath(p) for p in
              (sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(sys.executable))}
    blocked = {}  # ancestor -> set of child names needed
    for p in needed:
        parts = p.strip("/").split("/")
        for i in range(len(parts)):
            anc = "/" + "/".join(parts[:i])
            if anc != "/" and not os.stat(anc).st_mode & 0o001:
                blocked.setdefault(anc, set()).add(parts[i])
    for anc in sorted(blocked, key=len):
        fds = {c: os.open(os.path.join(anc, c), os.O_PATH) for c in blocked[anc]}
        _mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for child, fd in fds.items():
            dst = os.path.join(anc, child)
            if os.path.isdir("/proc/self/fd/%d" % fd):
                os.mkdir(dst)
            else:
                open(dst, "w").close()
            _mount("/proc/self/fd/%d" % fd, dst, None, MS_BIND | MS_REC, None)
            os.close(fd)


# ----------------------------------------------------------------------------- tests


def split_tests(tests, entry_point):
    """-> (preamble code object, [(label, code object)]). Tests are trusted dataset text."""
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

    def __init__(self, job, server_src):
        self.job = job
        self.server_src = server_src
        self.proc_pid = None
        self.names = {}
        self.init_error = None
        self.next_id = 1
        self.buf = b""

    def start(self):
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        out_fd = os.open("output.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null_fd = os.open("/dev/null", os.O_RDONLY)
        limits, uid = self.job["limits"], self.job.get("uid")
        pid = os.fork()
        if pid == 0:  # child: limits, user, then exec a fresh interpreter (no harness memory)
            try:
                os.setsid()
                high = [os.dup(fd) for fd in (null_fd, out_fd, out_fd, req_r, resp_w)]
                for target, fd in enumerate(high):  # high copies first: no fd clobbers another
                    os.dup2(fd, target, inheritable=True)
                os.closerange(5, 65536)
                _prctl(PR_SET_NO_NEW_PRIVS, 1)
                _apply_limits(limits, solution=True)
                if uid is not None:
                    os.setgroups([])
                    os.setgid(uid)
                    os.setuid(uid)
                env = {"PATH": "/usr/bin:/bin", "HOME": os.getcwd(), "TMPDIR": os.getcwd(),
                       "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
                       "PYTHONUNBUFFERED": "1"}
                os.execve(sys.executable, [sys.executable, "-I", "-u", "-c", self.server_src, "3", "4"], env)
            finally:
                os._exit(127)
        for fd in (req_r, resp_w, out_fd, null_fd):
            os.close(fd)
        self.proc_pid, self.req_w, self.resp_r, self.buf = pid, req_w, resp_r, b""
        self._send({"id": 0, "op": "init", "code": self.job["code"]})
        reply = self._recv(0)
        self.names, self.init_error = reply.get("names"), str(reply.get("error") or "")[:300]
        if type(self.names) is not dict:
            raise ProtocolError("bad init reply")

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
        self.proc_pid = None

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
        try:
            resource.setrlimit(res, (val, val))
        except (ValueError, OSError):
            soft, hard = resource.getrlimit(res)
            if hard == resource.RLIM_INFINITY or val <= hard:
                raise
            resource.setrlimit(res, (hard, hard))


def _kill_all_but_me():
    """As init of our PID namespace, kill(-1) reaches every other process in it and nothing
    outside. Without a PID namespace, kill what we can find below us (we are a subreaper)."""
    me = os.getpid()
    for _ in range(50):
        if me == 1:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for pid in _descendants(me):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        _reap()
        if not _children_exist():
            return
        time.sleep(0.01)


def _descendants(root):
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    stat = f.read()
                parent[int(name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], {root}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier}
        out += list(frontier)
    return out


def _reap():
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _children_exist():
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return False
    return True


# ----------------------------------------------------------------------------- main


def _alarm(signum, frame):
    raise Deadline("test timed out")


def run_units(job, server_src):
    limits = job["limits"]
    preamble, units = split_tests(job["tests"], job.get("entry_point"))
    proc = SolutionProcess(job, server_src)
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
                proc.start()
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
        ns[name] = value
        setattr(module, name, value)
    sys.modules["solution"] = module
    ns["__candidate__"] = ns.get(entry_point, last_callable) if entry_point else last_callable
    return ns


def main():
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace / /proc/<pid>/{mem,fd,environ} from the sandbox
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    raw = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        raw += chunk
    job = json.loads(raw)
    nonce = job.pop("nonce")
    result_fd = os.dup(1)  # the result goes here; prints of the test code go to stderr
    os.dup2(2, 1)
    out = {"passed": 0, "total": 0, "results": [], "output": "", "notes": _notes, "init_error": None}
    try:
        _apply_limits(job["limits"], solution=False)
        _setup_filesystem(job)  # after this, files under /tmp (a checkout there) are hidden: use SERVER_SRC
        results, out["init_error"] = run_units(job, SERVER_SRC)
        out["results"] = results
        out["total"] = len(results)
        out["passed"] = sum(1 for r in results if r[1])
        try:
            with open("output.txt", "rb") as f:
                out["output"] = f.read(job["limits"]["output_cap"]).decode("utf-8", "replace")
        except OSError:
            pass
    except BaseException as e:  # report harness trouble instead of dying silently
        out["harness_error"] = "%s: %s" % (type(e).__name__, e)
    finally:
        _kill_all_but_me()
    os.write(result_fd, (nonce + " " + json.dumps(out) + "\n").encode())
    return 0


_codec = {}
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_server.py")) as _f:
    SERVER_SRC = _f.read()  # read before the private mounts are made
exec(compile(SERVER_SRC, "_server.py", "exec"), _codec)
encode, decode, Unencodable = _codec["encode"], _codec["decode"], _codec["Unencodable"]

if __name__ == "__main__":
    sys.exit(main())
