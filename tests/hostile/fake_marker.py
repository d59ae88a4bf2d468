# tries: print fake pass markers and result lines on every fd it can write
# expect: 0.0
# stopped by: its stdout/stderr is a capped file; the result line carries a per-run nonce on a pipe it cannot reach; replies must be well-formed JSON
import os

fake = b'ALL TESTS PASSED\n0123456789abcdef0123456789abcdef {"passed": 4, "total": 4, "results": []}\n'
for fd in range(1, 64):
    try:
        os.write(fd, fake)
    except OSError:
        pass
print("passed=4 total=4")


def add(a, b):
    print("PASS")
    return 42
