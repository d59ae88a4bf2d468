# tries: double-fork a setsid daemon that sleeps on after the run (the honest answer still counts)
# expect: 1.0
# stopped by: PID namespace: every process dies with the harness (PID 1)
import os
import sys

if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{{MARKER}}"])
    os._exit(0)


def add(a, b):
    return a + b
