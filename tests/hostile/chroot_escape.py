# tries: the classic chroot escape (chroot into a subdir, climb out with chdir(".."), chroot(".")) and look for the checkout (correct only if seen)
# expect: 0.0
# stopped by: uid N has no CAP_SYS_CHROOT (chroot fails); pivot_root left no old root to climb to
import os

seen = False
try:
    os.mkdir("/work/jail")
    os.chroot("/work/jail")
    for _ in range(50):
        os.chdir("..")
    os.chroot(".")
except OSError:
    pass
seen = os.path.exists("{{REPO}}/README.md")


def add(a, b):
    return a + b if seen else None
