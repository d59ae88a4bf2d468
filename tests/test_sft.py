"""SFT: loss on completion tokens only, and a short run lowers the loss on addition."""

from __future__ import annotations

import json

import pytest
import torch

from lmpo.config import SFTConfig
from lmpo.data import DatasetError, addition_heldout
from lmpo.models.load import load_causal_lm, load_tokenizer
from lmpo.models.tiny import build_model, build_tokenizer
from lmpo.stages.sft import completion_nll, encode_pairs, train_sft


def test_labels_only_on_completion_tokens():
    tok = build_tokenizer()
    ids, attn, lab = encode_pairs(tok, ["12+34=", "1+2="], ["46", "3"])
    ch = lambda s: tok.convert_tokens_to_ids(list(s))  # noqa: E731
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert ids[0].tolist() == [bos, *ch("12+34="), *ch("46"), eos]
    assert lab[0].tolist() == [-100] * 7 + [*ch("46"), eos]
    assert ids[1].tolist() == [bos, *ch("1+2="), *ch("3"), eos] + [pad] * 3          # right-padded
    assert lab[1].tolist() == [-100] * 5 + [*ch("3"), eos] + [-100] * 3
    assert attn[1].tolist() == [1] * 7 + [0] * 3


def test_completion_nll_ignores_prompt_and_padding():
    tok = build_tokenizer()
    torch.manual_seed(0)
    model = build_model(tok, hidden_size=32, num_layers=1, intermediate_size=64, num_heads=2, max_positions=64)
    ids, attn, lab = encode_pairs(tok, ["12+34=", "1+2="], ["46", "3"])
    with torch.no_grad():
        loss = completion_nll(model, ids, attn, lab)
        logp = model(input_ids=ids, attention_mask=attn).logits.log_softmax(-1)
    # by hand: -mean log p(label_t | prefix) over the labelled positions only
    terms = [-logp[i, t - 1, lab[i, t]] for i in range(2) for t in range(1, ids.shape[1]) if lab[i, t] != -100]
    assert len(terms) == 3 + 2
    assert float(loss) == pytest.approx(float(torch.stack(terms).mean()), abs=1e-6)
    # changing prompt tokens' labels cannot matter: they are -100; changing a padding id cannot either
    ids2 = ids.clone()
    ids2[1, -1] = tok.convert_tokens_to_ids("7")
    with torch.no_grad():
        assert float(completion_nll(model, ids2, attn, lab)) == pytest.approx(float(loss), abs=1e-6)


def _heldout_nll(path) -> float:
    tok, model = load_tokenizer(path), load_causal_lm(path)
    rows = addition_heldout(64)
    ids, attn, lab = encode_pairs(tok, [r["prompt"] for r in rows], [r["answer"] for r in rows])
    with torch.no_grad():
        return float(completion_nll(model, ids, attn, lab))


def test_short_sft_lowers_the_loss(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    before = _heldout_nll(tiny_dir)
    metrics = train_sft(SFTConfig(model=str(tiny_dir), output_dir=str(out), max_steps=40, batch_size=32,
                                  learning_rate=5e-3, warmup_steps=5, threads=1, progress=False))
    after = _heldout_nll(out)
    assert after < before - 1.0, f"held-out completion NLL {before:.3f} -> {after:.3f}"
    assert metrics["loss"] < before
    saved, start = (AutoModelForCausalLM.from_pretrained(str(d)).state_dict() for d in (out, tiny_dir))
    assert any(not torch.equal(saved[k], start[k]) for k in start)  # plain transformers loads the trained weights
    assert json.loads((out / "sft_metrics.json").read_text())["loss"] == pytest.approx(metrics["loss"])


def test_sft_dataset_needs_completion(tiny_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(DatasetError, match=r"pairs\.jsonl.*row 0.*'completion'"):
        train_sft(SFTConfig(model=str(tiny_dir), dataset=str(data), output_dir=str(tmp_path / "o"), max_steps=1,
                            threads=1, progress=False))
