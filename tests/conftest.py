"""Shared fixtures: tiny models built once per session, and helpers to run the ``lmpo`` command.

Every test here runs on CPU with one thread. Nothing uses the default ``model`` (which would
build and SFT the embedded model into ``$LMPO_CACHE``): tests pass an explicit model directory,
and ``LMPO_CACHE`` points at a temporary directory in case one forgets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

torch.set_num_threads(1)

# A small Llama for the tests: the embedded architecture with 2 layers and a 64-token context
# (so "prompt longer than the context" is cheap to provoke).
TINY = dict(hidden_size=64, num_layers=2, intermediate_size=256, num_heads=4, max_positions=64)
WARM = dict(hidden_size=128, num_layers=2, intermediate_size=512, num_heads=4, max_positions=64)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    old = os.environ.get("LMPO_CACHE")
    os.environ["LMPO_CACHE"] = str(tmp_path_factory.mktemp("lmpo_cache"))
    yield
    if old is None:
        os.environ.pop("LMPO_CACHE", None)
    else:
        os.environ["LMPO_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A randomly initialized tiny Llama + the char tokenizer, saved with save_pretrained."""
    from lmpo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), seed=0, **TINY)


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory) -> Path:
    """A tiny Llama SFT-warmed on addition (≈25 s on one CPU thread): it writes 2–3 digit sums
    with the right length and often the right leading digit, and gets a few sums exactly right."""
    from lmpo.config import SFTConfig
    from lmpo.models.tiny import build_tiny
    from lmpo.stages.sft import train_sft

    base = build_tiny(tmp_path_factory.mktemp("warm_base"), seed=0, **WARM)
    out = tmp_path_factory.mktemp("warm_sft")
    train_sft(SFTConfig(model=str(base), output_dir=str(out), max_steps=200, batch_size=128, learning_rate=5e-3,
                        warmup_steps=10, threads=1, progress=False, seed=0))
    return out


def rl_overrides(model_dir, output_dir, **extra) -> list[str]:
    """Small, fast ``lmpo train`` settings as key=value strings."""
    base = dict(model=str(model_dir), output_dir=str(output_dir), threads=1, progress=False, group_size=4,
                prompts_per_step=4, max_new_tokens=4, max_steps=2, learning_rate=1e-3, eval_samples=8,
                reward_workers=1)
    base.update(extra)
    return [f"{k}={_yaml(v)}" for k, v in base.items()]


def _yaml(v):
    if isinstance(v, list):
        return "[" + ",".join(map(str, v)) + "]"
    return str(v)


def rl_config(model_dir, output_dir, **extra):
    from lmpo.config import load_config

    return load_config(None, rl_overrides(model_dir, output_dir, **extra))


def run_lmpo(args, cwd, timeout=1200) -> subprocess.CompletedProcess:
    """``python -m lmpo ARGS`` in ``cwd`` with the repository importable, as a user would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("LMPO_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lmpo", *map(str, args)], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- math tests

ATOL = 1e-6  # the tolerance of every hand-worked value in tests/test_algorithms_*.py


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (restored afterwards)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                               torch.as_tensor(b, dtype=torch.float64), atol=ATOL, rtol=0)


DIGITS_REWARD = '''
def digit_match(prompts, completions, answer=None, **kw):
    """Partial credit for a sum: the fraction of characters in the right place (a dense signal)."""
    out = []
    for c, g in zip(completions, answer):
        c, g = c.strip(), str(g)
        out.append(sum(a == b for a, b in zip(c, g)) / max(len(c), len(g), 1))
    return out
'''
