"""The rollout engine interface: what the loop asks of whatever generates completions.

An engine turns a list of prompts into a ``RolloutBatch`` of G completions each, with every sampled
token's log-prob under the sampling distribution (``sampler_logp``), and takes the trainer's new
weights after each update. The built-in KV-cache sampler (``lmpo.rollout.sampler``) is one engine;
vLLM (``lmpo.rollout.vllm_engine``) is another; a pool of Ray rollout workers is a third. The loop
only ever calls:

    engine.generate(prompts, rows, seeds, spec)  -> RolloutBatch      (one seed per prompt / group)
    engine.update_weights(model, version)                              (after each optimizer step)

``version`` is the number of optimizer steps the weights have taken; a batch carries the version
that generated each row (``RolloutBatch.policy_version``), so a trainer can tell how stale it is.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Protocol

import torch

from ..config import ConfigError
from .batch import RolloutBatch
from lmpo.rollout.sampler import SamplingSpec, rollout  # noqa: F401 (SamplingSpec: imported from here too)


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[str], rows: list[dict], seeds: list[int], spec: SamplingSpec) -> RolloutBatch:
        """G completions per prompt (grouped, prompt-major); ``seeds[j]`` drives prompt j's group."""

    def update_weights(self, model: torch.nn.Module, version: int) -> None:
        """The trainer's weights after ``version`` optimizer steps."""


class BuiltinEngine:
    """The built-in sampler on a ``torch.nn.Module``. Colocated with the trainer it generates with the
    trainer's own module (``update_weights`` is then free); given its own copy (a Ray rollout worker)
    it loads the trainer's state dict."""

    name = "builtin"

    def __init__(self, model: torch.nn.Module, tokenizer, device=None, unsharded=nullcontext, weights_dtype="float32"):
        self.model, self.tokenizer = model, tokenizer
        self.device = device or next(model.parameters()).device
        self.unsharded = unsharded      # fsdp: gather full weights around generation
        self.version = 0
        self.copy = None                # rollout.dtype=bfloat16: a bf16 copy of the policy that generates
        if weights_dtype == "bfloat16":
            self.copy = _bf16_copy(model)

    def generate(self, prompts, rows, seeds, spec: SamplingSpec) -> RolloutBatch:
        was_training = self.model.training
        self.model.eval()
        autocast = spec.dtype == "bfloat16" and self.copy is None
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if autocast else nullcontext()
        eager = eager_attention(self.model) if autocast and self.device.type == "cpu" else nullcontext()
        try:
            with ctx, eager, self.unsharded():
                batch = rollout(self.model if self.copy is None else self.copy, self.tokenizer, prompts, rows, spec,
                                device=self.device, seeds=seeds)
        finally:
            self.model.train(was_training)
        batch.policy_version = torch.full((len(batch),), self.version, dtype=torch.long)
        return batch

    def update_weights(self, model, version: int) -> None:
        if model is not self.model:
            self.model.load_state_dict(model.state_dict() if isinstance(model, torch.nn.Module) else model)
        if self.copy is not None:
            with torch.no_grad():
                for c, p in zip(self.copy.parameters(), self.model.parameters()):
                    c.copy_(p)                                   # cast to bf16 in place
        self.version = version


@contextmanager
def eager_attention(model: torch.nn.Module):
    """An HF model's attention switched to the eager (matmul) implementation inside the block: torch's CPU
    flash-attention kernel is several times slower in bfloat16 at one query per row (decoding)."""
    inner = getattr(model, "module", model)                                      # DDP
    config = getattr(inner, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager") or not hasattr(inner, "set_attn_implementation"):
        yield
        return
    inner.set_attn_implementation("eager")
    try:
        yield
    finally:
        inner.set_attn_implementation(before)


def _bf16_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen bfloat16 copy of a plain (single-process, non-LoRA) HF model."""
    if hasattr(model, "peft_config") or isinstance(model, torch.nn.parallel.DistributedDataParallel) or any(
            hasattr(p, "full_tensor") for p in model.parameters()):
        raise ConfigError("config key 'rollout.dtype': a bfloat16 generation copy is made for a plain single-process "
                          "model only (not with lora_r, DDP or FSDP); use dtype=bfloat16 (autocast) there.")
    out = copy.deepcopy(model).to(torch.bfloat16).eval().requires_grad_(False)
    if next(model.parameters()).device.type == "cpu" and hasattr(out, "set_attn_implementation"):
        out.set_attn_implementation("eager")   # torch's CPU flash-attention kernel is ~4x slower in bf16 at one query
    return out
