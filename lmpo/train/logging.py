"""Metrics to ``metrics.jsonl`` (one object per step), sample completions to ``samples.jsonl``,
optionally TensorBoard, and a progress bar with the live reward.

A run that starts at step ``initial`` (a resumed one) first cuts both files back to the rows of
steps 1 … ``initial`` (rows written after the checkpoint it resumes from are dropped, and so is a
torn last line), so every step appears exactly once."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir, tensorboard: bool = False, progress: bool = True, total: int = 0, initial: int = 0,
                 desc: str = "rl"):
        from tqdm.auto import tqdm

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "samples.jsonl"):
            truncate_jsonl(self.dir / name, initial)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the install
                raise ImportError("tensorboard=true needs the tensorboard package: pip install 'lmpo[tensorboard]'") from e
            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=initial + 1 if initial else None)
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not progress, dynamic_ncols=True)

    def log(self, step: int, metrics: dict, samples: list[dict] = ()):
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        _append(self.dir / "metrics.jsonl", [row])
        if samples:
            _append(self.dir / "samples.jsonl", [{"step": step, **s} for s in samples])
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        self.bar.update(1)
        self.bar.set_postfix({k: _fmt(row.get(key)) for k, key in (("reward", "reward/mean"), ("kl", "kl"))},
                             refresh=False)

    def close(self):
        self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _append(path: Path, rows: list[dict]):
    """Append whole lines; an OSError (a full disk) names the file."""
    try:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def truncate_jsonl(path: Path, last_step: int):
    """Keep the rows of steps <= ``last_step`` (atomically: a temporary file renamed over it)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue                                     # a line torn by a kill mid-write
        if row.get("step", 0) <= last_step:
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(keep))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "nan"


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
