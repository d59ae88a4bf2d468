# tries: spin forever at import time, never answering the harness
# expect: 0.0
# stopped by: per-test deadline (SIGALRM in the harness) and the wall limit
def add(a, b):
    return a + b


while True:
    pass
