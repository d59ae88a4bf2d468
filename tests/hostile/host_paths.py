# tries: see any host path: home, cache, checkout, checkpoint dir, host config, the venv (correct only if one exists)
# expect: 0.0
# stopped by: pivot_root into a fresh tmpfs root: only system dirs, the interpreter's tree, /dev nodes, /proc, /work, /tmp
import os

seen = [p for p in ("/root/.cache", "/root/.bashrc", "/home", "{{REPO}}", "{{CKPT}}", "{{PUBLIC}}",
                    "/etc/passwd", "/etc/hostname", "/var", "/opt", "/sys/kernel", "/run",
                    "/work/venv") if os.path.exists(p)]


def add(a, b):
    return a + b if seen else None
