"""Resumable checkpoints: models, optimizers, schedulers, RNG states, data position, step.

A checkpoint is written to a temporary directory and renamed into place, so an interrupted save
never leaves a half-written ``checkpoint/`` behind.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

CHECKPOINT = "checkpoint"


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


def save_checkpoint(output_dir, *, models: dict, states: dict, meta: dict, tokenizer=None) -> Path:
    """``models``: name -> HF model (save_pretrained); ``states``: name -> torch-saveable state."""
    out = Path(output_dir)
    final = out / CHECKPOINT
    tmp = out / f"{CHECKPOINT}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, model in models.items():
        if model is not None:
            model.save_pretrained(tmp / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "policy")
    torch.save({**states, "rng": rng_state()}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    old = out / f"{CHECKPOINT}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def find_checkpoint(output_dir) -> Path | None:
    out = Path(output_dir)
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):  # .old survives a crash between the two renames
        p = out / name
        if (p / "meta.json").exists() and (p / "state.pt").exists():
            return p
    return None


def load_state(path) -> tuple[dict, dict]:
    path = Path(path)
    states = torch.load(path / "state.pt", weights_only=False)
    meta = json.loads((path / "meta.json").read_text())
    return states, meta
