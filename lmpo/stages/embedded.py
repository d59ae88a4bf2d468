"""The embedded default policy: the tiny Llama warmed up by SFT on addition, built once and cached."""

from __future__ import annotations

import os
from pathlib import Path

from lmpo.config import SFTConfig
from lmpo.models.load import cache_dir
from lmpo.stages.sft import train_sft


def embedded_model(progress: bool = True) -> Path:
    """The embedded default policy: the tiny Llama after the default SFT warm start on addition,
    built once and cached under ``$LMPO_CACHE`` (default ``~/.cache/lmpo``)."""
    out = cache_dir() / "tiny-addition-sft40"
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    # the demo's warm start: stop once greedy validation accuracy reaches 0.4 (room left for RL)
    cfg = SFTConfig(output_dir=str(tmp), progress=progress, max_steps=450, batch_size=256, learning_rate=3e-3,
                    warmup_steps=30, eval_steps=25, stop_at_accuracy=0.4)
    train_sft(cfg)
    tmp.rename(out) if not out.exists() else None
    return out
