# tries: fake a pass by os._exit(0) at import time (a wrong add is all that is left)
# expect: 0.0
# stopped by: the verdict is the test's outcome in the harness; a dead server fails the unit
import os


def add(a, b):
    return a - b


os._exit(0)
