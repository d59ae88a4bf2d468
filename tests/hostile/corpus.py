"""Load and run the hostile corpus: each ``*.py`` here (except this file and tests.py) is a
"solution" to ``add(a, b)`` that attacks the sandbox. Its first lines say what it tries and
the reward it must get. Used by tests/test_rewards_hostile.py and bench/hostile_table.py.

Placeholders filled in per run: {{PORT}} (a TCP listener on the host's loopback),
{{REPO}}, {{CKPT}} (a checkpoint dir with model.safetensors), {{TAG}}, {{MARKER}} (a string a
daemon puts in its command line), {{TRAINER_PID}}, {{VICTIM_PID}} (a bystander process).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
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


@dataclass
class Outcome:
    program: Program
    reward: float
    seconds: float
    status: str
    results: list = field(default_factory=list)


def load_programs() -> list[Program]:
    out = []
    for fname in sorted(os.listdir(HERE)):
        if not fname.endswith(".py") or fname in ("corpus.py", "tests.py", "__init__.py"):
            continue
        with open(os.path.join(HERE, fname)) as f:
            src = f.read()
        tries = re.search(r"^# tries: (.+)$", src, re.M).group(1)
        expect = float(re.search(r"^# expect: ([0-9.]+)$", src, re.M).group(1))
        out.append(Program(fname[:-3], tries, expect, src))
    return out


def load_tests() -> str:
    with open(os.path.join(HERE, "tests.py")) as f:
        return f.read()


class Listener:
    """A loopback TCP server that records whether anything connected."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
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

    def fill(self, src: str) -> str:
        subs = {"PORT": self.listener.port, "REPO": REPO, "CKPT": self.ckpt, "TAG": self.tag,
                "MARKER": self.marker, "TRAINER_PID": os.getpid(), "VICTIM_PID": self.victim.pid}
        return re.sub(r"\{\{(\w+)\}\}", lambda m: str(subs[m.group(1)]), src)


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
    return stage


def teardown(stage: Stage):
    os.environ.pop("LMPO_HOSTILE_SECRET", None)
    stage.listener.close()
    stage.victim.kill()
    stage.victim.wait()


def run(stage: Stage, programs: list[Program]) -> list[Outcome]:
    """Score every program in one batch (concurrently), as training would."""
    from lmpo.rewards.code_reward import CodeTests
    from lmpo.rewards.sandbox import SandboxLimits

    reward = CodeTests(SandboxLimits(**LIMITS), max_workers=len(programs), tmp_root=stage.tmp_root)
    tests = load_tests()
    completions = ["```python\n%s```" % stage.fill(p.source) for p in programs]
    scores = reward([""] * len(programs), completions, tests=[tests] * len(programs))
    return [Outcome(p, s, r.seconds if r else 0.0, r.status if r else "-", r.results if r else [])
            for p, s, r in zip(programs, scores, reward.last_results)]


def leftovers(stage: Stage) -> list[str]:
    """What the runs left behind: processes, files, connections, harm. Empty means clean."""
    problems = []
    time.sleep(0.2)
    me = os.getpid()
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
        elif ppid == me and int(pid) != stage.victim.pid:
            problems.append("child process %s alive: %s" % (pid, cmd[:80]))
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
    return problems
