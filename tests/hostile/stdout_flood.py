# tries: flood stdout and stderr without end
# expect: 0.0
# stopped by: RLIMIT_FSIZE on its output file (SIGXFSZ/EFBIG), output capped in the result
import sys


def add(a, b):
    line = "spam " * 2000 + "\n"
    while True:
        sys.stdout.write(line)
        sys.stderr.write(line)
