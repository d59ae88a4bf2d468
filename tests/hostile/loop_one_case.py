# tries: hang on one input only (the other three tests must still count)
# expect: 0.75
def add(a, b):
    if a == 10:
        while True:
            pass
    return a + b
