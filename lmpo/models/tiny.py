"""The embedded default: a character-level tokenizer and a ~1 M-parameter Llama, built locally.

Nothing is downloaded. Both are saved with ``save_pretrained`` so that plain transformers loads
them (``AutoTokenizer.from_pretrained(d)``, ``AutoModelForCausalLM.from_pretrained(d)``).
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
# printable ASCII (space .. ~) plus newline and tab
CHARS = [chr(c) for c in range(32, 127)] + ["\n", "\t"]


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: one token per printable ASCII character,
    plus ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; ``<bos>`` is prepended to every encoding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=512,
    )


def build_model(tokenizer, hidden_size=128, num_layers=4, intermediate_size=512, num_heads=4,
                max_positions=512, seed=0):
    """A small Llama (``LlamaForCausalLM``) with random weights; defaults give ~1.05 M parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_tiny(out_dir: str | Path, seed: int = 0, **model_kwargs) -> Path:
    """Build and save the embedded tokenizer and a randomly initialized tiny Llama to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, **model_kwargs)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

