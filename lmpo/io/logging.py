"""Metrics to ``metrics.jsonl`` (one object per step), sample completions to ``samples.jsonl``,
optionally TensorBoard and the trackers named in ``report_to`` (each in its offline or local mode
unless its own environment variables say otherwise), and a progress bar with the live reward.

A run that starts at step ``initial`` (a resumed one) first cuts both files back to the rows of
steps 1 … ``initial`` (rows written after the checkpoint it resumes from are dropped, and so is a
torn last line), so every step appears exactly once."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from lmpo.config import TRACKERS



class MetricsLogger:
    def __init__(self, output_dir, tensorboard: bool = False, progress: bool = True, total: int = 0, initial: int = 0,
                 desc: str = "rl", report_to=(), config: dict | None = None):
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
        self.trackers = [open_tracker(name, self.dir, config or {}) for name in report_to if name != "tensorboard"]
        if "tensorboard" in report_to and self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

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
        if self.trackers:
            scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))
                       and not isinstance(v, bool) and math.isfinite(v)}
            for t in self.trackers:
                t.log(scalars, step)
        self.bar.update(1)
        self.bar.set_postfix({k: _fmt(row.get(key)) for k, key in (("reward", "reward/mean"), ("kl", "kl"))},
                             refresh=False)

    def close(self):
        self.bar.close()
        for t in self.trackers:
            t.close()
        if self.tb is not None:
            self.tb.close()


class _Tracker:
    def __init__(self, log, close):
        self.log, self.close = log, close


def open_tracker(name: str, output_dir: Path, config: dict) -> _Tracker:
    """A tracker's run, local by default: wandb in offline mode under ``output_dir/wandb`` (unless
    WANDB_MODE is set), MLflow to the file store ``output_dir/mlruns`` (unless MLFLOW_TRACKING_URI is
    set), trackio in its local database (TRACKIO_DIR to move it). Project / experiment: ``lmpo``
    (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME, TRACKIO_PROJECT to change); run name: the output directory's."""
    run_name = Path(output_dir).resolve().name
    if name == "wandb":
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lmpo"), name=run_name, config=config,
                         dir=str(output_dir), mode=os.environ.get("WANDB_MODE", "offline"))
        def finish():
            run.finish()
            wandb.teardown()        # and its wandb-core service: the run leaves no process behind

        return _Tracker(lambda m, step: run.log(m, step=step), finish)
    if name == "mlflow":
        import mlflow

        mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or (Path(output_dir).resolve() / "mlruns").as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "lmpo"))
        run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})
        return _Tracker(lambda m, step: mlflow.log_metrics(m, step=step, run_id=run.info.run_id),
                        lambda: mlflow.end_run())
    if name == "trackio":
        import trackio

        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "lmpo"), name=run_name, config=config)
        return _Tracker(lambda m, step: trackio.log(m, step=step), trackio.finish)
    raise ValueError(f"unknown tracker '{name}'; allowed: {', '.join(TRACKERS)}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _append(path: Path, rows: list[dict]):
    """Append whole lines; an OSError (a full disk) names the file."""
    try:
        with open(path, "a") as f:
            f.write("".join(json.dumps(r, default=str) + "\n" for r in rows))  # log_extra may hold anything
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
