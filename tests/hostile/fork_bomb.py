# tries: fork bomb (every process forks forever)
# expect: 0.0
# stopped by: RLIMIT_NPROC (unique uid per run), per-test deadline, PID namespace torn down with its PID 1
import os


def add(a, b):
    while True:
        try:
            os.fork()
        except OSError:
            pass
