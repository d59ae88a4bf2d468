# tries: return an object that compares equal to everything
# expect: 0.0
# stopped by: only plain data crosses to the harness; the object stays in the server (a handle has no truth value)
class AlwaysEqual(int):
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = int.__hash__


def add(a, b):
    return AlwaysEqual(0)
