# tries: crash the interpreter with a segmentation fault on one input
# expect: 0.8
# stopped by: the crash kills the server only; it is restarted for the next unit
import ctypes


def add(a, b):
    if a == -1:
        ctypes.string_at(0)
    return a + b
