# tries: hold 1.2 GB in 12 processes of 100 MB each, every one under the per-process limit (correct only if all 12 held their memory at once)
# expect: 0.0
# stopped by: the run's memory cgroup bounds all its processes together (OOM inside the cgroup)
import os
import select
import time

r, w = os.pipe()
held = 0
for _ in range(12):
    try:
        if os.fork() == 0:
            block = b"x" * (100 << 20)  # written, so really resident
            os.write(w, b"1")
            time.sleep(30)
            os._exit(0)
    except OSError:
        pass
os.close(w)
end = time.monotonic() + 1.5
while held < 12 and time.monotonic() < end:
    if select.select([r], [], [], 0.1)[0]:
        chunk = os.read(r, 12)
        if not chunk:
            break
        held += len(chunk)


def add(a, b):
    return a + b if held >= 12 else None
