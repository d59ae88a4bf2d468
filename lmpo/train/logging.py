"""Metrics to ``metrics.jsonl`` (one object per step), sample completions to ``samples.jsonl``,
optionally TensorBoard, and a progress bar with the live reward."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLogger:
    def __init__(self, output_dir, tensorboard: bool = False, progress: bool = True, total: int = 0, initial: int = 0,
                 desc: str = "rl"):
        from tqdm.auto import tqdm

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # pragma: no cover - depends on the install
                raise ImportError("tensorboard=true needs the tensorboard package: pip install 'lmpo[tensorboard]'") from e
            self.tb = SummaryWriter(str(self.dir / "tb"))
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not progress, dynamic_ncols=True)

    def log(self, step: int, metrics: dict, samples: list[dict] = ()):
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if samples:
            with open(self.dir / "samples.jsonl", "a") as f:
                for s in samples:
                    f.write(json.dumps({"step": step, **s}, default=str) + "\n")  # log_extra may hold anything
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


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "nan"


def _plain(v):
    """A JSON value; a non-finite float as the string "NaN", "Infinity" or "-Infinity" (JSON has no
    such numbers; ``float()`` reads the strings back), never null."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    return v


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line, object_hook=_floats) for line in path.read_text().splitlines() if line.strip()]


def _floats(row: dict) -> dict:
    """The "NaN" / "Infinity" / "-Infinity" strings ``_plain`` writes, as floats again."""
    return {k: float(v) if v in ("NaN", "Infinity", "-Infinity") else v for k, v in row.items()}
