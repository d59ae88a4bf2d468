"""The output directory of a training run, guarded before any model loads:

* it must be (or become) a writable directory with some free space;
* one run at a time: ``lmpo.lock`` is held with ``flock`` for the whole run and names its holder
  (pid, host); the kernel drops the lock when the holder dies, so a stale lock is simply taken over;
* a fresh run (no ``--resume``) into a directory that holds an earlier run refuses, or with
  ``overwrite_output_dir: true`` removes that run's files first; it never appends to them;
* what an interrupted checkpoint save left behind is removed.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

from lmpo.errors import OutputError  # noqa: F401 (its home is lmpo.errors; imported from here too)
from lmpo.config import ConfigError
from lmpo.io.checkpoint import CHECKPOINTS, LEGACY, clean_stale, find_checkpoint

LOCK = "lmpo.lock"
MIN_FREE_MIB = 64
# what a run writes (the lock file stays: another process may be waiting on it)
RUN_FILES = ("metrics.jsonl", "samples.jsonl", "summary.json", "config.json", "ray_workers.json", "final", "tb",
             CHECKPOINTS, LEGACY, f"{LEGACY}.tmp", f"{LEGACY}.old")


def check_output_dir(path) -> Path:
    """Create ``path`` if needed and check that it is a writable directory with free space."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"output_dir '{out}' exists and is not a directory; give a directory path "
                          "(config key 'output_dir').") from None
    except NotADirectoryError:
        raise OutputError(f"output_dir '{out}' cannot be created: a part of its path is a file, not a directory "
                          "(config key 'output_dir').") from None
    except PermissionError:
        raise OutputError(f"output_dir '{out}' cannot be created: permission denied on a parent directory "
                          "(config key 'output_dir').") from None
    except OSError as e:
        raise OutputError(f"output_dir '{out}' cannot be created: {e.strerror or e} (config key 'output_dir').") from None
    probe = out / f".lmpo-write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"output_dir '{out}' is not writable ({e.strerror or e}); choose another directory "
                          "(config key 'output_dir') or fix its permissions.") from None
    free = shutil.disk_usage(out).free / 2**20
    if free < MIN_FREE_MIB:
        raise OutputError(f"output_dir '{out}' has {free:.1f} MiB free, less than the {MIN_FREE_MIB} MiB a run needs "
                          "for metrics and checkpoints: free some space or choose another output_dir.")
    return out


@contextmanager
def locked(out: Path):
    """Hold ``out/lmpo.lock`` (flock, exclusive, non-blocking) with this process's pid and host in it."""
    import fcntl

    path = out / LOCK
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise OutputError(f"output_dir '{out}' is in use by another lmpo run ({holder}, lock file {path}); "
                          "wait for it to finish, stop it, or choose another output_dir.") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
        f.flush()
        yield
    finally:
        f.close()                                                   # releases the flock


def earlier_run(out: Path) -> list[str]:
    """What an earlier run that took at least one step left (config.json alone is a run that stopped
    before its first step: nothing to protect)."""
    return [name for name in RUN_FILES if (out / name).exists() and name not in ("config.json", "ray_workers.json")]


def start_fresh(out: Path, overwrite: bool):
    found = earlier_run(out)
    if found and not overwrite:
        raise OutputError(f"output_dir '{out}' holds an earlier run ({', '.join(found)}). Continue it with --resume, "
                          "start anew with overwrite_output_dir=true (its files are removed), or choose another "
                          "output_dir.")
    for p in (out / name for name in RUN_FILES):
        if not p.exists() and not p.is_symlink():
            continue
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@contextmanager
def guard(cfg, resume: bool):
    """Everything above, for the process that writes (rank 0, or the driver of a Ray run); no-op in
    other ranks. (The Ray learner does not call it: its driver holds the lock.)"""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    out = check_output_dir(cfg.output_dir)
    with locked(out):
        if resume:
            clean_stale(out)
            if find_checkpoint(out) is None:
                print(f"lmpo: --resume: no checkpoint in {out} (the run stopped before its first save); "
                      "starting from step 0.", file=sys.stderr, flush=True)
        else:
            start_fresh(out, cfg.overwrite_output_dir)
        yield


def no_space_error(cfg, e: BaseException) -> OutputError:
    """A full disk as one paragraph: the file being written, and the checkpoint that is kept."""
    path = None
    seen = set()
    while e is not None and id(e) not in seen and path is None:
        seen.add(id(e))
        path = getattr(e, "filename", None) if isinstance(e, OSError) else None
        e = e.__cause__ or e.__context__
    try:
        ckpt = find_checkpoint(cfg.output_dir)
    except ConfigError:
        ckpt = None
    kept = (f"The last checkpoint, {ckpt}, is kept: free some space, then rerun with --resume to continue."
            if ckpt else "No checkpoint had been written yet: free some space and rerun.")
    return OutputError(f"no space left on device while writing {path or cfg.output_dir} (output_dir "
                       f"'{cfg.output_dir}'). {kept}")
