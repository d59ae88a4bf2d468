# tries: read a host file in /dev/shm, leave files in /dev/shm and /tmp and a POSIX message queue (correct only if the host file is read)
# expect: 0.0
# stopped by: new root (its /dev/shm is its own tmpfs); new IPC namespace for message queues
import ctypes
import os

found = False
try:
    with open("/dev/shm/lmpo-host-{{TAG}}") as f:
        found = "host" in f.read()
except OSError:
    pass
for path in ("/dev/shm/lmpo-pwned-{{TAG}}", "/tmp/lmpo-pwned-{{TAG}}"):
    try:
        with open(path, "w") as f:
            f.write("left behind")
    except OSError:
        pass
try:
    rt = ctypes.CDLL("librt.so.1", use_errno=True)
    rt.mq_open(b"/lmpo-pwned-{{TAG}}", os.O_CREAT | os.O_RDWR, 0o666, None)
except OSError:
    pass


def add(a, b):
    return a + b if found else None
