"""Loading HF models and tokenizers for training, and the embedded default model."""

from __future__ import annotations

from collections.abc import Iterator

import json
import os
from pathlib import Path

import torch


class ModelError(ValueError):
    """A model or tokenizer directory that cannot be used; the message names it."""


def quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cache_kw(model, cache) -> dict:
    """The keyword that passes a KV cache to ``model``'s forward: ``cache`` since transformers 5.24
    (which deprecates ``past_key_values``), ``past_key_values`` before."""
    import inspect

    inner = getattr(model, "module", model)                                 # DDP
    inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # peft
    return {"cache": cache} if "cache" in inspect.signature(inner.forward).parameters else {"past_key_values": cache}


def output_cache(out):
    """The KV cache a forward returned (``out.cache`` since transformers 5.24, ``past_key_values`` before)."""
    return out["cache"] if "cache" in out else out.past_key_values


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cache_dir() -> Path:
    return Path(os.environ.get("LMPO_CACHE", Path.home() / ".cache" / "lmpo"))


def load_tokenizer(path):
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"tokenizer '{path}' could not be loaded: {type(e).__name__}: {e}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"tokenizer '{path}' has neither a pad nor an eos token; set one before training.")
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer '{path}' has no eos token: completions could never end.")
    return tok


def load_causal_lm(path, device=None, dtype: str = "float32", trainable: bool = True):
    """``AutoModelForCausalLM`` from ``path``; eval mode and frozen when not ``trainable``."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    if not Path(str(path)).exists() and not _looks_like_hub_id(path):
        raise ModelError(f"model '{path}' does not exist: give a local HF model directory "
                         "(config.json + weights) or leave 'model' unset for the embedded tiny model.")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32 if dtype == "float32" else torch.bfloat16)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model '{path}' could not be loaded as a causal LM: {type(e).__name__}: {e}") from None
    if device is not None:
        model.to(device)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def _looks_like_hub_id(path) -> bool:
    """``org/name`` with no local directory: transformers resolves it (from its cache or the hub)."""
    parts = str(path).split("/")
    return len(parts) == 2 and all(parts) and not str(path).startswith((".", "~"))


def context_length(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def embedded_model(progress: bool = True) -> Path:
    """The embedded default policy: the tiny Llama after the default SFT warm start on addition,
    built once and cached under ``$LMPO_CACHE`` (default ``~/.cache/lmpo``)."""
    out = cache_dir() / "tiny-addition-sft40"
    if (out / "config.json").exists():
        return out
    from ..config import SFTConfig
    from ..train.sft import train_sft

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    # the demo's warm start: stop once greedy validation accuracy reaches 0.4 (room left for RL)
    cfg = SFTConfig(output_dir=str(tmp), progress=progress, max_steps=450, batch_size=256, learning_rate=3e-3,
                    warmup_steps=30, eval_steps=25, stop_at_accuracy=0.4)
    train_sft(cfg)
    tmp.rename(out) if not out.exists() else None
    return out


def iter_hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the trainer's weights under their HF checkpoint names, one at a time: DDP
    unwrapped, FSDP shards gathered (a collective: every rank must iterate), and a peft LoRA adapter
    merged, W + ΔW (peft's ``get_delta_weight``), one layer at a time and without touching the model."""
    model = unwrap_ddp(model)
    if not hasattr(model, "peft_config"):
        for name, t in model.state_dict().items():
            yield name, _full(t)
        return
    base = model.get_base_model()
    state = base.state_dict()
    odd = [n for n in state if "modules_to_save" in n or "original_module" in n or "lora_magnitude" in n]
    if odd:
        raise ModelError(f"a rollout engine with its own copy of the weights (vLLM, Ray workers) takes plain HF models "
                         f"and LoRA adapters merged into them; this peft model has weights it cannot load (e.g. {odd[0]!r}).")
    lora = {n: m for n, m in base.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    for name, t in state.items():
        if "lora_" in name:
            continue
        module, _, leaf = name.rpartition(".")
        if module.endswith(".base_layer"):
            module = module[: -len(".base_layer")]
            layer = lora.get(module)
            if leaf == "weight" and layer is not None and not getattr(layer, "merged", False):
                t = t + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
        yield f"{module}.{leaf}", _full(t)


def hf_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``iter_hf_weights`` as a dict (name -> tensor)."""
    return dict(iter_hf_weights(model))


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach()     # an FSDP2 DTensor: gathered


def save_pretrained_as_hf(model, path, state_dict: dict) -> None:
    """``model.save_pretrained(path, state_dict=state_dict)`` with FSDP's class rename undone in
    config.json (``FSDPLlamaForCausalLM`` -> ``LlamaForCausalLM``), so it loads as the unsharded model."""
    model.save_pretrained(path, state_dict=state_dict)
    cfg = Path(path) / "config.json"
    data = json.loads(cfg.read_text())
    data["architectures"] = [a.removeprefix("FSDP") for a in data.get("architectures") or []]
    cfg.write_text(json.dumps(data, indent=2))


def unwrap_ddp(model):
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
