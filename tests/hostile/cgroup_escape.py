# tries: leave its memory cgroup (write its pid into a parent cgroup, raise its limit) or see any cgroup file (correct only if one is seen)
# expect: 0.0
# stopped by: new root without /sys; uid N cannot write cgroup files anyway
import os

seen = []
for path in ("/sys/fs/cgroup", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/cgroup.procs"):
    if os.path.exists(path):
        seen.append(path)
for path in ("/sys/fs/cgroup/memory/cgroup.procs", "/sys/fs/cgroup/cgroup.procs"):
    try:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
        seen.append(path)
    except OSError:
        pass


def add(a, b):
    return a + b if seen else None
