# tries: fake a pass by raising SystemExit(0) and KeyboardInterrupt from the function and exiting 0 at exit
# expect: 0.0
# stopped by: a BaseException from the solution is a RemoteError in the harness: the unit fails
import atexit
import os

atexit.register(lambda: os._exit(0))


def add(a, b):
    if a == 0:
        raise KeyboardInterrupt
    raise SystemExit(0)
