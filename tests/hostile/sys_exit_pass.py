# tries: fake a pass by exiting with status 0 before any test can fail
# expect: 0.0
import sys


def add(a, b):
    sys.exit(0)


print("4 passed")
sys.exit(0)
