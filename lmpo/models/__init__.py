"""Models: loading HF models and tokenizers, the embedded tiny model, value/reward heads, MoE routing."""
