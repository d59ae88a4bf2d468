# tries: crash the interpreter with a segmentation fault on one input
# expect: 0.75
import ctypes


def add(a, b):
    if a == -1:
        ctypes.string_at(0)
    return a + b
