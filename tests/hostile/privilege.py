# tries: become root (setuid(0), setgid(0)), make a device node, mount a filesystem, load a setuid binary's privileges (correct only if one works)
# expect: 0.0
# stopped by: uid N, no capabilities, no_new_privs; setuid binaries cannot raise privileges
import ctypes
import os
import stat

libc = ctypes.CDLL(None, use_errno=True)
won = []
for name, fn in (("setuid", lambda: os.setuid(0)), ("setgid", lambda: os.setgid(0)),
                 ("mknod", lambda: os.mknod("/work/sda", stat.S_IFBLK | 0o666, os.makedev(8, 0))),
                 ("sethostname", lambda: libc.sethostname(b"pwned", 5) == 0 or 1 / 0)):
    try:
        fn()
        won.append(name)
    except (OSError, ZeroDivisionError):
        pass
if libc.mount(b"none", b"/work", b"tmpfs", 0, None) == 0:
    won.append("mount")
if os.geteuid() == 0:
    won.append("root")


def add(a, b):
    return a + b if won else None
