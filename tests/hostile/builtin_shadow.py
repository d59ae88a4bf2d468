# tries: define sorted, abs, set, len and the tests' helper at top level so the tests call its versions (its add is wrong)
# expect: 0.0
# stopped by: the test namespace takes no solution name that is a builtin's (except the entry point); the tests' own helpers are defined after the solution's names
def sorted(x):
    return [2, 3]


def abs(x):
    return 2


def set(x):
    return x


def len(x):
    return 0


def check_eq(a, b):
    return None


def add(a, b):
    return None
