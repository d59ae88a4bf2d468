# tries: allocate memory without bound
# expect: 0.0
# stopped by: RLIMIT_AS per process and the run's memory cgroup
def add(a, b):
    hog = []
    while True:
        hog.append(bytearray(64 << 20))
