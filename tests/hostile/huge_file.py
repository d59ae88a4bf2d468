# tries: fill the disk with a huge file in the work dir
# expect: 0.0
# stopped by: RLIMIT_FSIZE and the size-capped tmpfs root
def add(a, b):
    chunk = b"\0" * (1 << 20)
    with open("huge.bin", "wb") as f:
        for _ in range(100_000):  # 100 GB
            f.write(chunk)
    return a + b
