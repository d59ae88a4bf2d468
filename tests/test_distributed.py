"""Multi-process training on CPU with gloo: 2 processes give the weights of 1 process on the same
global batch (DDP-style and FSDP2), rank 0 alone writes, and a 2-rank checkpoint resumes in 1 process.

The tiny model's addition reward is always 0 at random init (no gradient), so these runs use a
reward with variance (the fraction of digits in the completion), whitened advantages (a batch
statistic, so the global gather matters) and the reference model (beta > 0).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, read_jsonl, rl_overrides, run_lmpo, write_jsonl

from lmpo.config import ConfigError, check_world, load_config
from lmpo.parallel import torchrun as D
from lmpo.io.checkpoint import find_checkpoint

REWARD = "def digits(prompts, completions, **kw):\n    return [sum(c.isdigit() for c in s) / 4 for s in completions]\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, cwd, nproc=2, timeout=1200) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={_free_port()}", "-m", "lmpo", "train", *map(str, args)]
    return subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)


def weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_same_weights(a, b, moved_from=None, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    diff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert diff < atol, f"max weight difference {diff}"
    if moved_from is not None:  # the comparison is not vacuous: training changed the weights
        w0 = weights(moved_from)
        assert max((wa[k] - w0[k]).abs().max().item() for k in wa) > 100 * atol


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory, tiny_dir):
    from lmpo.data import load_rows

    d = tmp_path_factory.mktemp("dist")
    write_jsonl(d / "data.jsonl", load_rows("addition", required=("prompt",))[:32])
    (d / "rw.py").write_text(REWARD)
    return d


def overrides(setup_dir, tiny_dir, out, **extra):
    return rl_overrides(tiny_dir, out, dataset=setup_dir / "data.jsonl", reward_funcs=[f"{setup_dir / 'rw.py'}:digits"],
                        **{"algo.whiten_advantages": "true", "save_steps": 1, **extra})


def train_here(args, resume=False):
    """One process: the loop in this one (no interpreter to start; the runs that need processes of
    their own, torchrun's, are the ones compared with it)."""
    from lmpo.rl.loop import train

    train(load_config(None, [str(a) for a in args]), resume=resume)


@pytest.fixture(scope="module")
def single(setup_dir, tiny_dir):
    out = setup_dir / "one"
    train_here(overrides(setup_dir, tiny_dir, out))
    return out


@pytest.fixture(scope="module")
def ddp(setup_dir, tiny_dir):
    out = setup_dir / "ddp"
    r = torchrun([*overrides(setup_dir, tiny_dir, out), "distributed.strategy=ddp"], setup_dir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out


def test_ddp_two_processes_give_the_single_process_weights(single, ddp, tiny_dir):
    assert_same_weights(single / "final", ddp / "final", moved_from=tiny_dir)
    assert_same_weights(find_checkpoint(single) / "policy", find_checkpoint(ddp) / "policy")
    one, two = read_jsonl(single / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    assert [m["step"] for m in two] == [1, 2]                          # rank 0 alone logs
    for a, b in zip(one, two):
        assert b["reward/mean"] == pytest.approx(a["reward/mean"], abs=1e-6)    # the same samples
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)        # the same global gradient
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-7)        # local shares summed


def test_fsdp_launched_by_lmpo_train_gives_the_single_process_weights(single, setup_dir, tiny_dir):
    out = setup_dir / "fsdp"
    r = run_lmpo(["train", *overrides(setup_dir, tiny_dir, out), "distributed.strategy=fsdp", "distributed.nproc=2"],
                 setup_dir)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "torch.distributed.run" in r.stderr                        # lmpo train re-launched itself
    assert_same_weights(single / "final", out / "final", moved_from=tiny_dir)
    assert '"FSDP' not in (out / "final" / "config.json").read_text()   # loadable architecture name
    assert_same_weights(find_checkpoint(single) / "policy", find_checkpoint(out) / "policy")


def test_two_rank_checkpoint_resumes_in_one_process(single, ddp, setup_dir, tiny_dir):
    runs = {}
    for name, src in (("one", single), ("ddp", ddp)):
        out = setup_dir / f"resume_{name}"
        shutil.copytree(src, out)
        train_here(overrides(setup_dir, tiny_dir, out, max_steps=3), resume=True)
        runs[name] = out
    assert [m["step"] for m in read_jsonl(runs["ddp"] / "metrics.jsonl")] == [1, 2, 3]
    assert_same_weights(runs["one"] / "final", runs["ddp"] / "final", moved_from=single / "final")


# ----------------------------------------------------------------------------- no processes


def test_one_process_hooks_are_identities():
    one = D.World()
    picked = [(i, {"prompt": str(i)}) for i in range(4)]
    assert D.shard(one, picked) == (0, picked)
    t = {"global_tokens": torch.tensor(5.0)}
    assert D.all_sum(one, t) is t
    assert D.global_rows(one, lambda **kw: kw["mask"] * 2, mask=torch.ones(2, 3)).tolist() == [[2.0] * 3] * 2
    assert D.reduce_metrics(one, {"a": 1}) == {"a": 1}


def test_shard_takes_contiguous_groups_with_global_indices():
    picked = list(range(8))
    assert D.shard(D.World(1, 2, "ddp"), picked) == (4, [4, 5, 6, 7])
    assert D.shard(D.World(0, 4, "ddp"), picked) == (0, [0, 1])


def test_combine_metrics():
    out = D.combine_metrics([{"reward/mean": 1.0, "loss": 0.25, "actor/ratio_max": 1.1, "actor/ratio_min": 0.9,
                              "time/step_s": 2.0, "reward/invalid": 1, "name": "a"},
                             {"reward/mean": 0.0, "loss": 0.5, "actor/ratio_max": 1.3, "actor/ratio_min": 0.8,
                              "time/step_s": 3.0, "reward/invalid": 2, "name": "b"}])
    assert out == {"reward/mean": 0.5, "loss": 0.75, "actor/ratio_max": 1.3, "actor/ratio_min": 0.8,
                   "time/step_s": 3.0, "reward/invalid": 3, "name": "a"}
    # Ray reward workers: means weighted by the part's size, counts summed, a missing count is 0
    out = D.combine_metrics([{"reward/x/mean": 1.0, "reward/x/failures": 1.0}, {"reward/x/mean": 4.0}], [3, 1])
    assert out == {"reward/x/mean": 1.75, "reward/x/failures": 1.0}


@pytest.mark.parametrize("extra, key", [
    (["prompts_per_step=3"], "prompts_per_step"),
    (["algorithm=dapo"], "dynamic sampling"),
    (["distributed.strategy=fsdp", "lora_r=4"], "lora_r"),
    (["distributed.strategy=fsdp", "ppo.critic=separate"], "ppo.critic"),
    (["distributed.strategy=none"], "distributed.strategy"),
])
def test_config_errors_before_joining_a_process_group(monkeypatch, extra, key):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["prompts_per_step=4", "distributed.strategy=ddp", *extra])
    with pytest.raises(ConfigError, match=key):
        D.init(cfg)


@pytest.mark.parametrize("name, world", [("gsm8k_qwen_multi_gpu.yaml", 8), ("gsm8k_qwen_multi_node.yaml", 16)])
def test_scale_out_recipes_are_valid_configs(name, world):
    cfg = load_config(str(REPO / "examples" / name), [])
    assert cfg.distributed.strategy in ("ddp", "fsdp")
    check_world(cfg, world)
