"""Load and run the hostile corpus: each ``*.py`` here (except this file and tests.py) is a
"solution" to ``add(a, b)`` that attacks the sandbox. Its first lines say what it tries and
the reward it must get. Used by tests/test_rewards_hostile.py and bench/hostile_table.py.

Placeholders filled in per run: {{PORT}} (a TCP listener on the host's loopback),
{{REPO}}, {{CKPT}} (a checkpoint dir with model.safetensors), {{TAG}}, {{MARKER}} (a string a
daemon puts in its command line), {{TRAINER_PID}}, {{VICTIM_PID}} (a bystander process),
{{PUBLIC}} (a world-readable host dir) holding {{DATASET}} (a world-readable dataset file with
the tests) and {{SOCK}} (a world-writable unix socket the host listens on), {{SHMKEY}} (the key
of a host SysV shared-memory segment, mode 666). The host also listens on the abstract socket
``\0lmpo-hostile-{{TAG}}`` and holds /dev/shm/lmpo-host-{{TAG}}.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import secrets
import socket
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SANDBOX_UID_MIN = 10**6
LIMITS = dict(cpu_s=2, wall_s=4, test_timeout_s=2, mem_mb=512, nproc=24, nofile=64,
              fsize_mb=8, tmpfs_mb=32, output_cap=4096)


@dataclass
class Program:
    name: str
    tries: str
    expect: float
    source: str
    stopped_by: str = ""


@dataclass
class Outcome:
    program: Program
    reward: float
    seconds: float
    status: str
    results: list = field(default_factory=list)
    peak_mb: float | None = None


def load_programs() -> list[Program]:
    out = []
    for fname in sorted(os.listdir(HERE)):
        if not fname.endswith(".py") or fname in ("corpus.py", "tests.py", "__init__.py"):
            continue
        with open(os.path.join(HERE, fname)) as f:
            src = f.read()
        tries = re.search(r"^# tries: (.+)$", src, re.M).group(1)
        expect = float(re.search(r"^# expect: ([0-9.]+)$", src, re.M).group(1))
        stopped = re.search(r"^# stopped by: (.+)$", src, re.M)
        out.append(Program(fname[:-3], tries, expect, src, stopped.group(1) if stopped else ""))
    return out


def load_tests() -> str:
    with open(os.path.join(HERE, "tests.py")) as f:
        return f.read()


class Listener:
    """A server socket (loopback TCP by default) that records whether anything connected."""

    def __init__(self, family=socket.AF_INET, address=("127.0.0.1", 0)):
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.bind(address)
        if isinstance(address, str) and not address.startswith("\0"):
            os.chmod(address, 0o777)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1] if family == socket.AF_INET else None
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop = True
        self._thread.join()
        self.sock.close()


@dataclass
class Stage:
    """Everything a run needs and everything checked afterwards."""

    tmp_root: str
    ckpt: str
    tag: str = field(default_factory=lambda: secrets.token_hex(6))
    marker: str = field(default_factory=lambda: "lmpo-daemon-" + secrets.token_hex(6))
    listener: Listener | None = None
    victim: subprocess.Popen | None = None
    public: str = ""
    unix: Listener | None = None
    abstract: Listener | None = None
    shm_key: int = 0
    shm_id: int = -1
    public_files: list = field(default_factory=list)
    hashes: dict = field(default_factory=dict)

    @property
    def dataset(self):
        return os.path.join(self.public, "dataset.jsonl")

    @property
    def sock_path(self):
        return os.path.join(self.public, "host.sock")

    def fill(self, src: str) -> str:
        subs = {"PORT": self.listener.port, "REPO": REPO, "CKPT": self.ckpt, "TAG": self.tag,
                "MARKER": self.marker, "TRAINER_PID": os.getpid(), "VICTIM_PID": self.victim.pid,
                "PUBLIC": self.public, "DATASET": self.dataset, "SOCK": self.sock_path,
                "SHMKEY": self.shm_key}
        return re.sub(r"\{\{(\w+)\}\}", lambda m: str(subs[m.group(1)]), src)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = ctypes.c_void_p
HOSTILE_IPC_KEYS = (0x4C4D0001, 0x4C4D0002, 0x4C4D0003, 0x4C4D0004)  # what sysv_ipc tries to leave
SHM_MARK = b"lmpo-host-segment"
WATCHED = [os.path.join(REPO, "lmpo", "rewards", n) for n in ("_harness.py", "_server.py", "sandbox.py")]


def _shm_read(shm_id: int) -> bytes:
    addr = _libc.shmat(shm_id, None, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return b""
    try:
        return ctypes.string_at(addr, len(SHM_MARK))
    finally:
        _libc.shmdt(ctypes.c_void_p(addr))


def _sysv_objects() -> list[str]:
    """Host SysV IPC objects made by a sandbox uid or with a key the corpus uses."""
    out = []
    for kind in ("shm", "sem", "msg"):
        with open("/proc/sysvipc/" + kind) as f:
            head = f.readline().split()
            for line in f:
                row = dict(zip(head, line.split()))
                if int(row.get("cuid", 0)) >= SANDBOX_UID_MIN or int(row["key"]) in HOSTILE_IPC_KEYS:
                    out.append("%s key=%s" % (kind, row["key"]))
    return out


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def setup(base: str) -> Stage:
    tmp_root = os.path.join(base, "sandboxes")
    ckpt = os.path.join(base, "checkpoints")
    os.makedirs(tmp_root)
    os.makedirs(ckpt)
    with open(os.path.join(ckpt, "model.safetensors"), "wb") as f:
        f.write(b"weights")
    stage = Stage(tmp_root, ckpt)
    stage.listener = Listener()
    stage.victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    os.environ["LMPO_HOSTILE_SECRET"] = "s3cret-" + stage.tag
    # things an unsandboxed process of any uid could reach: a world-readable dataset, a
    # world-writable unix socket, an abstract socket, a SysV segment, a file in /dev/shm
    stage.public = tempfile.mkdtemp(prefix="lmpo-hostile-public-")
    os.chmod(stage.public, 0o755)
    with open(stage.dataset, "w") as f:
        f.write(json.dumps({"prompt": "add", "tests": load_tests()}) + "\n")
    os.chmod(stage.dataset, 0o644)
    stage.unix = Listener(socket.AF_UNIX, stage.sock_path)
    stage.abstract = Listener(socket.AF_UNIX, "\0lmpo-hostile-" + stage.tag)
    stage.public_files = sorted(os.listdir(stage.public))
    stage.shm_key = 0x4C4D0000 + secrets.randbelow(1 << 16) + 16
    stage.shm_id = _libc.shmget(stage.shm_key, 4096, 0o1666)  # IPC_CREAT | 0666
    addr = _libc.shmat(stage.shm_id, None, 0)
    ctypes.memmove(addr, SHM_MARK, len(SHM_MARK))
    _libc.shmdt(ctypes.c_void_p(addr))
    with open("/dev/shm/lmpo-host-" + stage.tag, "w") as f:
        f.write("host secret")
    os.chmod("/dev/shm/lmpo-host-" + stage.tag, 0o644)
    stage.hashes = {p: _sha(p) for p in WATCHED}
    return stage


def teardown(stage: Stage):
    os.environ.pop("LMPO_HOSTILE_SECRET", None)
    stage.listener.close()
    stage.unix.close()
    stage.abstract.close()
    stage.victim.kill()
    stage.victim.wait()
    _libc.shmctl(stage.shm_id, 0, None)  # IPC_RMID
    shutil.rmtree(stage.public, ignore_errors=True)
    for path in ("/dev/shm/lmpo-host-" + stage.tag, "/dev/shm/lmpo-pwned-" + stage.tag):
        if os.path.exists(path):
            os.remove(path)


def run(stage: Stage, programs: list[Program]) -> list[Outcome]:
    """Score every program in one batch (concurrently), as training would."""
    from lmpo.rewards.code_reward import CodeTests
    from lmpo.rewards.sandbox import SandboxLimits

    reward = CodeTests(SandboxLimits(**LIMITS), max_workers=len(programs), tmp_root=stage.tmp_root)
    tests = load_tests()
    completions = ["```python\n%s```" % stage.fill(p.source) for p in programs]
    scores = reward([""] * len(programs), completions, tests=[tests] * len(programs))
    return [Outcome(p, s, r.seconds if r else 0.0, r.status if r else "-", r.results if r else [],
                    r.peak_mb if r else None)
            for p, s, r in zip(programs, scores, reward.last_results)]


def leftovers(stage: Stage) -> list[str]:
    """What the runs left behind: processes, files, connections, harm. Empty means clean."""
    from lmpo.rewards import math_reward, sandbox

    problems = []
    time.sleep(0.2)
    me = os.getpid()
    zygote = sandbox._zygote.proc.pid if sandbox._zygote.proc is not None else None  # the fork server stays
    pool = math_reward._POOL          # math_answer's verifier processes (from other tests) stay too
    helpers = {p.pid for p in pool._idle} if pool is not None else set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            st = os.stat("/proc/" + pid)
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open("/proc/%s/stat" % pid) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if st.st_uid >= SANDBOX_UID_MIN:
            problems.append("process %s of a sandbox uid alive: %s" % (pid, cmd[:80]))
        elif stage.marker in cmd:
            problems.append("daemon %s alive: %s" % (pid, cmd[:80]))
        elif ppid == me and int(pid) not in (stage.victim.pid, zygote, *helpers):
            problems.append("child process %s alive: %s" % (pid, cmd[:80]))
        elif zygote is not None and ppid == zygote:
            problems.append("sandbox process %s (a child of the fork server) alive: %s" % (pid, cmd[:80]))
    if os.listdir(stage.tmp_root):
        problems.append("sandbox dirs left: %s" % os.listdir(stage.tmp_root))
    for path in (os.path.join(REPO, "PWNED-%s.txt" % stage.tag),
                 os.path.join(stage.ckpt, "PWNED-%s.txt" % stage.tag),
                 "/tmp/lmpo-pwned-%s" % stage.tag):
        if os.path.exists(path):
            problems.append("file written outside the sandbox: " + path)
    if not os.path.exists(os.path.join(stage.ckpt, "model.safetensors")):
        problems.append("checkpoint deleted")
    if stage.listener.connections:
        problems.append("%d connection(s) reached the loopback listener" % stage.listener.connections)
    if stage.victim.poll() is not None:
        problems.append("bystander process was killed")
    for name, lst in (("unix socket", stage.unix), ("abstract socket", stage.abstract)):
        if lst.connections:
            problems.append("%d connection(s) reached the host's %s" % (lst.connections, name))
    if sorted(os.listdir(stage.public)) != stage.public_files:
        problems.append("host dir changed: %s" % os.listdir(stage.public))
    if _shm_read(stage.shm_id) != SHM_MARK:
        problems.append("host SysV segment changed: %r" % _shm_read(stage.shm_id))
    problems += ["IPC object left on the host: " + o for o in _sysv_objects()]
    if os.path.exists("/dev/shm/lmpo-pwned-" + stage.tag):
        problems.append("file left in the host's /dev/shm")
    try:
        rt = ctypes.CDLL("librt.so.1", use_errno=True)
        mq = rt.mq_open(("/lmpo-pwned-" + stage.tag).encode(), os.O_RDONLY)
        if mq >= 0:
            rt.mq_close(mq)
            rt.mq_unlink(("/lmpo-pwned-" + stage.tag).encode())
            problems.append("POSIX message queue left on the host")
    except OSError:
        pass
    for path, digest in stage.hashes.items():
        if _sha(path) != digest:
            problems.append("sandbox source changed: " + path)
    if sandbox._cgroups is not None:
        left = [n for n in os.listdir(sandbox._cgroups.base) if n.startswith("lmpo-sbx-")]
        if left:
            problems.append("cgroups left: %s" % left)
    return problems
