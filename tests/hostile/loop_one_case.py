# tries: hang on one input only (the other four tests must still count)
# expect: 0.8
# stopped by: per-test deadline; the server is restarted for the next unit
def add(a, b):
    if a == 10:
        while True:
            pass
    return a + b
