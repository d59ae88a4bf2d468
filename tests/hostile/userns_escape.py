# tries: make a user namespace (root inside it), then mount, chroot out and look for the host's files (correct only if the checkout is seen)
# expect: 0.0
# stopped by: a user namespace gains nothing here: pivot_root left no host path, mounts it makes are its own
import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
seen = False
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0:
    try:
        uid = os.getuid()
        with open("/proc/self/uid_map", "w") as f:
            f.write("0 %d 1" % uid)
    except OSError:
        pass
    for src, dst, fs in ((b"none", b"/tmp", b"tmpfs"), (b"proc", b"/tmp", b"proc"), (b"/", b"/tmp", None)):
        libc.mount(src, dst, fs, 0, None)
    try:
        os.chroot("/tmp")
        for _ in range(40):
            os.chdir("..")
        os.chroot(".")
    except OSError:
        pass
seen = os.path.exists("{{REPO}}/README.md")


def add(a, b):
    return a + b if seen else None
