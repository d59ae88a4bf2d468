"""Resumable checkpoints: models, optimizers, schedulers, RNG states, data position, step.

Layout, atomic at every instant::

    output_dir/checkpoints/step-00000040/    a complete checkpoint (meta.json is written last)
    output_dir/checkpoints/latest            the name of the one --resume uses ("step-00000040")

A save writes ``step-N.tmp/``, fsyncs every file and the directory, renames it to ``step-N/``, then
replaces ``latest`` atomically (a fsynced temporary file renamed over it) and only then removes the
older step directories. A kill anywhere leaves ``latest`` naming a complete checkpoint (or no
``latest`` before the first save); what a kill leaves behind (a ``.tmp`` directory, a finished
step directory not yet named by ``latest``, a half-removed old one) is removed by ``clean_stale``
when the next run starts. ``LMPO_FAULT_POINT=NAME[@STEP]`` (test-only fault injection) SIGKILLs
the process at the named point of the save of step STEP (any step when omitted); the names are
the ``fault(...)`` calls below.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch
from lmpo.config import ConfigError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
LEGACY = "checkpoint"          # the single directory of earlier versions; still resumed from


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fault(point: str, step: int | None = None):
    """Test-only fault injection: SIGKILL this process when ``LMPO_FAULT_POINT`` names this point."""
    want = os.environ.get("LMPO_FAULT_POINT")
    if not want:
        return
    name, _, at = want.partition("@")
    if name == point and (not at or step is None or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


class _FaultyFile:
    """A binary file that stops at ``<point>:during`` after its first write (fault injection)."""

    def __init__(self, f, point: str, step: int):
        self.f, self.point, self.step, self.n = f, point, step, 0

    def write(self, data):
        n = self.f.write(data)
        self.n += 1
        if self.n == 1:
            self.f.flush()
            fault(self.point + ":during", self.step)
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


def _write(path: Path, step: int, dump):
    """``dump(file)`` into ``path``, flushed and fsynced; fault points during and after."""
    with open(path, "wb") as raw:
        dump(_FaultyFile(raw, f"save:{path.name}", step) if os.environ.get("LMPO_FAULT_POINT") else raw)
        raw.flush()
        os.fsync(raw.fileno())
    fault(f"save:{path.name}:after", step)


def _fsync_tree(root: Path):
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(d))


def _fsync_dir(d: Path):
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(output_dir, step: int, *, models: dict, states: dict, meta: dict, tokenizer=None) -> Path:
    """``models``: name -> HF model (save_pretrained); ``states``: name -> torch-saveable state.
    A save of the step ``latest`` already holds is skipped (the state is the same). On a failed
    write (a full disk) the partial directory is removed and ``latest`` is untouched."""
    root = Path(output_dir) / CHECKPOINTS
    final = root / step_name(step)
    if current_name(output_dir) == final.name:
        return final
    fault("save:begin", step)
    tmp = root / (final.name + ".tmp")
    for stale in (tmp, final):                      # left by a run that died while saving this step
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    try:
        for name, model in models.items():
            if model is not None:
                fault(f"save:{name}:before", step)
                model.save_pretrained(tmp / name)
                fault(f"save:{name}:after", step)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "policy")
            fault("save:tokenizer:after", step)
        _write(tmp / "state.pt", step, lambda f: torch.save({**states, "rng": rng_state()}, f))
        text = json.dumps({**meta, "step": step}, indent=2).encode()
        _write(tmp / "meta.json", step, lambda f: (f.write(text[:len(text) // 2]), f.write(text[len(text) // 2:])))
        _fsync_tree(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)     # frees the space; latest still names the previous one
        if no_space(e):                             # named: the step directory being written
            raise OSError(errno.ENOSPC, "No space left on device", getattr(e, "filename", None) or str(tmp)) from e
        raise
    fault("save:fsynced", step)
    tmp.rename(final)
    _fsync_dir(root)
    fault("save:renamed", step)
    _point_latest(root, final.name, step)
    fault("save:pointed", step)
    for old in root.iterdir():                      # the previous checkpoints, now unreferenced
        if old.name not in (final.name, LATEST):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
            fault("save:removed-old", step)
    legacy = Path(output_dir) / LEGACY
    if legacy.is_dir():
        shutil.rmtree(legacy)
    return final


def _point_latest(root: Path, name: str, step: int):
    tmp = root / (LATEST + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(name + "\n")
            fault("save:latest.tmp:during", step)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:                            # a full disk: name the file
        e.filename = e.filename or str(tmp)
        raise
    fault("save:latest.tmp:after", step)
    os.replace(tmp, root / LATEST)
    fault("save:latest:replaced", step)
    _fsync_dir(root)


def current_name(output_dir) -> str | None:
    p = Path(output_dir) / CHECKPOINTS / LATEST
    try:
        return p.read_text().strip() or None
    except FileNotFoundError:
        return None


def find_checkpoint(output_dir) -> Path | None:
    """The complete checkpoint ``latest`` names (or an earlier version's ``checkpoint/``); None
    when the run never finished a save. ``latest`` naming a missing directory is an error."""
    out = Path(output_dir)
    name = current_name(out)
    if name is None:
        legacy = out / LEGACY
        return legacy if (legacy / "meta.json").exists() and (legacy / "state.pt").exists() else None
    p = out / CHECKPOINTS / name
    if not ((p / "meta.json").exists() and (p / "state.pt").exists()):
        raise ConfigError(f"{out / CHECKPOINTS / LATEST} names '{name}', but {p} is not a complete checkpoint "
                          "(removed by hand?); restore it, or start anew without --resume.")
    return p


def clean_stale(output_dir):
    """Remove what an interrupted save or cleanup left: every entry of ``checkpoints/`` except
    ``latest`` and the directory it names."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return
    keep = {current_name(output_dir), LATEST}
    for p in root.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def load_state(path) -> tuple[dict, dict]:
    path = Path(path)
    states = torch.load(path / "state.pt", weights_only=False)
    meta = json.loads((path / "meta.json").read_text())
    return states, meta


def no_space(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it) is a full disk or quota: an OSError ENOSPC / EDQUOT, or a
    library's wrapped report of one (torch's and safetensors' writers re-raise as other types)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "StorageFull" in text or "os error 28" in text:
            return True
        e = e.__cause__ or e.__context__
    return False
