# tries: fake a pass by exiting with status 0 before any test can fail
# expect: 0.0
# stopped by: SystemExit at import or in a call fails the unit in the harness
import sys


def add(a, b):
    sys.exit(0)


print("4 passed")
sys.exit(0)
