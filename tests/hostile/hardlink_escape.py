# tries: hard-link host files into the work dir (the dataset, the interpreter, the harness's output file) to read or change them (correct only if the dataset is linked)
# expect: 0.0
# stopped by: host files are not in its root; links across mounts fail (EXDEV); /.output is root's
import os

linked = False
for i, src in enumerate(("{{DATASET}}", "/.output", "/etc/ld.so.cache", "/proc/1/exe", "{{REPO}}/README.md")):
    try:
        os.link(src, "/work/hard%d" % i)
        linked = linked or src == "{{DATASET}}"
    except OSError:
        pass


def add(a, b):
    return a + b if linked else None
