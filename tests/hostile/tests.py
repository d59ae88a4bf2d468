# The trusted tests every hostile program is scored against: 4 units
# (2 test functions using a helper, 2 top-level asserts).


def check_eq(a, b):
    assert a == b, (a, b)


def test_small():
    check_eq(add(1, 2), 3)


def test_negative():
    check_eq(add(-1, 1), 0)


assert add(10, 5) == 15
assert add(0, 0) == 0
