"""Reward model: the Bradley–Terry loss by hand, learning to rank, save/load through plain
transformers, the scorer, preference data and the command's errors."""

import json
import math
import random

import pytest
import torch

from lmpo.data.datasets import DatasetError
from lmpo.data.preferences import addition_preferences, load_preferences, wrong_sum
from lmpo.models.tiny import build_tiny
from lmpo.rewards.reward_model import RewardModelScorer
from lmpo.stages.reward_model import FitSpec, RMConfig, bradley_terry_loss, continue_training, main, train_reward_model


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 1 thread is faster than 2 for this model size on a small shared CPU
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- the loss


def test_bradley_terry_loss_by_hand():
    rc = torch.tensor([1.0, 0.0, 2.0])
    rr = torch.tensor([0.0, 0.0, 0.0])
    # -log σ(1) = log(1 + e^-1) = 0.3132617, -log σ(0) = log 2 = 0.6931472, -log σ(2) = 0.1269280
    expected = (0.31326169 + 0.69314718 + 0.12692801) / 3
    torch.testing.assert_close(bradley_terry_loss(rc, rr), torch.tensor(expected), atol=1e-6, rtol=0)
    # margin m = [1, 0, 0]: differences become [0, 0, 2]
    expected_m = (0.69314718 + 0.69314718 + 0.12692801) / 3
    torch.testing.assert_close(bradley_terry_loss(rc, rr, torch.tensor([1.0, 0.0, 0.0])),
                               torch.tensor(expected_m), atol=1e-6, rtol=0)
    # d/dr_c of -log σ(d) = -σ(-d); for d = 1: -0.2689414, averaged over 3 pairs
    rc = torch.tensor([1.0], requires_grad=True)
    bradley_terry_loss(rc, torch.tensor([0.0])).backward()
    torch.testing.assert_close(rc.grad, torch.tensor([-0.26894142]), atol=1e-6, rtol=0)
    # large differences stay finite (log-sigmoid, not log of sigmoid)
    assert torch.isfinite(bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0])))
    assert bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0])).item() == pytest.approx(400.0)


# ----------------------------------------------------------------------------- learning to rank


def _echo_pairs(n, seed):
    """Toy preferences: the chosen answer to 'a+b=' is the last digit of b, the rejected one
    another digit. Ranking them needs the response compared with the prompt (every digit is
    chosen as often as rejected), yet a tiny model learns it in ~100 steps; the addition task
    itself needs minutes (docs/reward_model.md)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, w = rng.randint(10, 99), rng.randint(10, 99), rng.randint(0, 9)
        while w == b % 10:
            w = rng.randint(0, 9)
        out.append({"prompt": f"{a}+{b}=", "chosen": str(b % 10), "rejected": str(w)})
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model_dir = build_tiny(d / "tiny", hidden_size=64, num_layers=2, intermediate_size=256, num_heads=4)
    cfg = RMConfig(model=str(model_dir), dataset=_jsonl(d / "train.jsonl", _echo_pairs(3000, 0)),
                   eval_dataset=_jsonl(d / "eval.jsonl", _echo_pairs(200, 1)), max_steps=100, batch_size=32,
                   learning_rate=3e-3, warmup_steps=10, output_dir=str(d / "out"), progress=False)
    metrics = train_reward_model(cfg)
    torch.set_num_threads(n)
    return d / "out", metrics


def test_reward_model_learns_to_rank(trained):
    out, metrics = trained
    assert metrics["eval/pairs"] == 200
    assert metrics["eval/accuracy"] >= 0.8, metrics
    assert metrics["eval/accuracy_before"] < 0.7
    curve = metrics["train/loss_curve"]
    assert curve[-1]["train/loss"] < curve[0]["train/loss"] - 0.2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval/accuracy"] == metrics["eval/accuracy"] and "eval/loss" in saved


def test_saved_reward_model_loads_with_plain_transformers(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    texts = ["37+48=8", "37+48=3", "5+60=0!"]
    scorer = RewardModelScorer(out, device="cpu")
    ours = scorer.score_texts(texts)
    with torch.no_grad():
        for text, r in zip(texts, ours):  # one text at a time: no padding, HF's default positions
            hf = model(**tok(text, return_tensors="pt")).logits[0, 0].item()
            assert hf == pytest.approx(r, abs=1e-5)
        # a left-padded batch: HF reads the last non-pad token too
        enc = tok(texts, padding=True, return_tensors="pt")
        assert model(**enc).logits.shape == (3, 1)


def test_scorer_batch_equals_single(trained):
    out, _ = trained
    pairs = _echo_pairs(40, 7)
    prompts = [p["prompt"] for p in pairs] * 2
    completions = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    prompts += [p["prompt"] + "1" * (i % 7) for i, p in enumerate(pairs)]  # lengths vary: padding in batches
    completions += [p["chosen"] + "!" * (i % 5) for i, p in enumerate(pairs)]
    batched = RewardModelScorer(out, batch_size=16, device="cpu")
    single = RewardModelScorer(out, batch_size=1, device="cpu")
    assert batched.name == "reward_model" and batched.__name__ == "reward_model"
    a = batched(prompts, completions, answer=["unused"] * len(prompts))
    b = single(prompts, completions)
    assert len(a) == 120 and all(isinstance(x, float) for x in a)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    # TRL conversational completions give the same scores as text
    conv = batched(prompts[:3], [[{"role": "assistant", "content": c}] for c in completions[:3]])
    assert conv == pytest.approx(a[:3], abs=1e-6)
    # it ranks: chosen over rejected for most pairs
    assert sum(x > y for x, y in zip(a[:40], a[40:80])) >= 32


def test_continue_training_with_replay(trained, tmp_path):
    out, _ = trained
    new = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": p["chosen"]} for p in _echo_pairs(64, 3)]
    old = _echo_pairs(64, 4)
    before = RewardModelScorer(out, device="cpu")
    m = continue_training(out, new, old, replay_frac=0.25, fit=FitSpec(steps=4, lr=1e-3, batch_size=8),
                          output_dir=tmp_path / "rm2", device="cpu")
    assert m["rm/steps"] == 4 and m["rm/new_pairs"] == 64 and m["rm/replay_pairs"] == 64
    assert math.isfinite(m["rm/loss"])
    after = RewardModelScorer(tmp_path / "rm2", device="cpu")
    texts = ["12+34=4", "12+34=6"]
    assert before.score_texts(texts) != after.score_texts(texts)
    with pytest.raises(ValueError, match="replay_frac"):
        continue_training(out, new, old, replay_frac=1.0, fit=FitSpec(steps=1))


# ----------------------------------------------------------------------------- data and errors


def test_addition_preferences():
    pairs = addition_preferences(300, seed=0)
    assert len(pairs) == 300
    for p in pairs:
        a, b = p["prompt"][:-1].split("+")
        assert p["chosen"] == str(int(a) + int(b)) and p["rejected"] != p["chosen"] and int(p["rejected"]) >= 0
    assert addition_preferences(50, seed=0) == addition_preferences(50, seed=0)[:50]
    held = addition_preferences(10, seed=0, heldout=True)
    train_prompts = {p["prompt"] for p in addition_preferences(2000, seed=1)}
    assert not train_prompts & {p["prompt"] for p in held}
    rng = random.Random(0)
    assert wrong_sum(85, rng, "plus_one") == 86 and wrong_sum(85, rng, "minus_ten") == 75
    assert wrong_sum(85, rng, "digit_swap") == 58 and wrong_sum(145, rng, "digit_swap") == 154
    assert wrong_sum(55, rng, "digit_swap") != 55 and wrong_sum(80, rng, "digit_swap") != 80


def test_load_preferences_validates(tmp_path):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2},
            {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "ok"}],
             "rejected": "no"}]
    out = load_preferences(_jsonl(tmp_path / "p.jsonl", rows))
    assert out[0]["margin"] == 2.0 and out[1]["margin"] == 0.0 and out[1]["chosen"] == "ok"
    bad = tmp_path / "bad.jsonl"
    with pytest.raises(DatasetError, match=r"bad.jsonl' row 1 has no 'rejected' column"):
        load_preferences(_jsonl(bad, [rows[0], {"prompt": "q", "chosen": "a"}]))
    with pytest.raises(DatasetError, match=r"row 0: 'margin' must be a finite number"):
        load_preferences(_jsonl(bad, [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "lots"}]))
    with pytest.raises(DatasetError, match=r"row 0: 'chosen' must be the response text"):
        load_preferences(_jsonl(bad, [{"prompt": "q", "chosen": 3, "rejected": "b"}]))


def test_main_reports_errors_as_one_paragraph(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                    # the default output_dir (runs/rm) is created and locked here
    assert main(["max_stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "max_stepz" in err and "max_steps" in err and err.count("\n") == 1
    assert main([f"dataset={tmp_path / 'none.jsonl'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    train = _jsonl(tmp_path / "p.jsonl", _echo_pairs(20, 0))
    assert main([f"model={tmp_path / 'empty'}", f"dataset={train}", "progress=false"]) == 2
    assert "could not be loaded as a reward model" in capsys.readouterr().err
    assert main(["eval_fraction=1.5"]) == 2
    assert "eval_fraction" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "learning_rate" in capsys.readouterr().out
