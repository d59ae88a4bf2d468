"""The ``lmpo`` command end to end, as a user runs it: ``python -m lmpo`` from a clean directory."""

from __future__ import annotations

import json

from conftest import read_jsonl, run_lmpo

from lmpo.config import Config, SFTConfig, _all_keys


def test_train_end_to_end_from_a_clean_directory(sft_dir, tmp_path):
    (tmp_path / "tiny.yaml").write_text(
        f"model: {sft_dir}\nmax_steps: 2\ngroup_size: 4\nprompts_per_step: 4\nmax_new_tokens: 4\n"
        "eval_samples: 8\nthreads: 1\nprogress: false\noutput_dir: runs/demo\n")
    res = run_lmpo(["train", "tiny.yaml", "learning_rate=1e-4", "algo.eps_high=0.28"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "runs" / "demo"                       # relative output_dir lands in the cwd
    assert "saved to runs/demo/final" in res.stdout
    summary = json.loads(res.stdout.strip().splitlines()[-2])
    assert {"reward/mean", "eval/greedy_accuracy"} <= set(summary)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    assert (out / "final" / "config.json").exists() and (out / "checkpoints" / "step-00000002" / "state.pt").exists()
    saved = json.loads((out / "config.json").read_text())
    assert saved["learning_rate"] == 1e-4 and saved["algo"]["eps_high"] == 0.28
    assert "Traceback" not in res.stderr

    again = run_lmpo(["train", "tiny.yaml", "max_steps=3", "--resume"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]


def test_train_help_lists_every_key(tmp_path):
    res = run_lmpo(["train", "--help"], cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("usage: lmpo train")
    for key in _all_keys(Config):
        assert f"  {key} = " in res.stdout, key
    sft = run_lmpo(["sft", "--help"], cwd=tmp_path)
    assert sft.returncode == 0 and all(f"  {k} = " in sft.stdout for k in _all_keys(SFTConfig))
    top = run_lmpo(["--help"], cwd=tmp_path)
    assert top.returncode == 0 and "lmpo train" in top.stdout and "lmpo sft" in top.stdout


def test_unknown_key_exits_2_with_one_paragraph(tiny_dir, tmp_path):
    res = run_lmpo(["train", f"model={tiny_dir}", "learnin_rate=1e-5"], cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.startswith("lmpo train: error: unknown config key 'learnin_rate'. Did you mean 'learning_rate'?")
    assert "Traceback" not in res.stderr and "\n\n" not in res.stderr.strip() and len(res.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "runs").exists(), "a config error must not start a run"


def test_unknown_command_and_option(tmp_path):
    res = run_lmpo(["trian"], cwd=tmp_path)
    assert res.returncode == 2 and "unknown command 'trian'. Did you mean 'train'?" in res.stderr
    res = run_lmpo(["train", "--resum"], cwd=tmp_path)
    assert res.returncode == 2 and "unknown option '--resum'. Did you mean '--resume'?" in res.stderr
    assert "Traceback" not in res.stderr


def test_sft_command(tiny_dir, tmp_path):
    res = run_lmpo(["sft", f"model={tiny_dir}", "max_steps=3", "batch_size=8", "threads=1", "progress=false",
                    "output_dir=warm"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    metrics = json.loads(res.stdout.strip().splitlines()[0])
    assert metrics["steps"] == 3 and metrics["loss"] > 0
    assert (tmp_path / "warm" / "config.json").exists() and (tmp_path / "warm" / "tokenizer.json").exists()
