# tries: flood stdout and stderr without end
# expect: 0.0
import sys


def add(a, b):
    line = "spam " * 2000 + "\n"
    while True:
        sys.stdout.write(line)
        sys.stderr.write(line)
