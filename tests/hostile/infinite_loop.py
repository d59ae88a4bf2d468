# tries: spin forever at import time, never answering the harness
# expect: 0.0
def add(a, b):
    return a + b


while True:
    pass
