# tries: return an object that compares equal to everything
# expect: 0.0
class AlwaysEqual(int):
    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    __hash__ = int.__hash__


def add(a, b):
    return AlwaysEqual(0)
