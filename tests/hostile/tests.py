# The trusted tests every hostile program is scored against: 5 units
# (2 test functions using a helper, 3 top-level asserts, one of them calling builtins).


def check_eq(a, b):
    assert a == b, (a, b)


def test_small():
    check_eq(add(1, 2), 3)


def test_negative():
    check_eq(add(-1, 1), 0)


assert add(10, 5) == 15
assert add(0, 0) == 0
assert sorted(set([add(2, 1), abs(add(-3, 1))])) == [2, 3]
