# tries: allocate memory without bound
# expect: 0.0
def add(a, b):
    hog = []
    while True:
        hog.append(bytearray(64 << 20))
