"""vLLM as the rollout engine (``rollout.engine: vllm``): see docs/vllm.md.

Two ways to reach vLLM (``rollout.vllm_mode``):

- ``colocate``: a ``vllm.LLM`` in this process, on the trainer's GPU. It sleeps (level 1: weights
  offloaded to CPU, KV cache freed) while the trainer works and wakes up to generate; the trainer's
  newest weights are copied into it right before a generation that follows an update.
- ``server``: an already running ``vllm serve`` at ``rollout.vllm_url``. Completions come from
  ``/v1/completions``; after an update the weights are written with ``save_pretrained`` into
  ``rollout.vllm_sync_dir`` and the server is asked to reload them (a dev-mode endpoint).

Both modes turn vLLM's answers into a ``RolloutBatch`` with the same function,
``to_rollout_batch``, which needs neither vLLM nor a GPU. vLLM itself is imported only when a
colocated engine is built, so this module imports without it.

Seeds: each prompt is one vLLM request with ``n = G`` and ``seed = seeds[j]``; vLLM gives the k-th
of the G samples the seed ``seeds[j] + k``, each with its own random generator, so a group depends
on its seed alone, not on which other requests share the batch (up to the floating-point
differences of batched kernels).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lmpo.errors import VLLMServerError  # noqa: F401 (its home is lmpo.errors; imported from here too)
from ..config import ConfigError
from ..models.load import hf_weights, iter_hf_weights, save_pretrained_as_hf, unwrap_ddp
from .batch import RolloutBatch, encode_prompts
from .engine import SamplingSpec
from lmpo.models.load import resolve_device

INSTALL = "pip install 'lmpo[vllm]'"
HTTP_TIMEOUT_S = 1800.0   # one /v1/completions request (a whole group) or one weight reload
MAX_CONCURRENT_REQUESTS = 64


# ----------------------------------------------------------------------------- outputs -> batch


@dataclass
class Completion:
    """One sampled completion as vLLM reports it."""

    token_ids: list[int]        # the sampled tokens, the stop token (EOS) included when one ended it
    logprobs: list[float]       # log-prob of each of them under the distribution it was sampled from
    finish_reason: str | None   # "stop" (a stop token ended it), "length" (max_tokens reached); None: unknown


def to_rollout_batch(tokenizer, prompts: list[str], rows: list[dict], groups: list[list[Completion]],
                     prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, version: int = 0,
                     device=None) -> RolloutBatch:
    """The ``RolloutBatch`` of B prompts with G completions each (``groups[j]``: prompt j's G
    completions, in sample order), shaped like the built-in ``rollout``'s.

    prompt_ids, prompt_mask: [B, P] left-padded (``encode_prompts``). Returns a batch of N = B·G
    rows, prompt-major (rows j·G … j·G+G−1 are prompt j's), with ``completion_ids`` [N, T]
    right-padded with the pad id, T the longest completion (EOS included); ``mask`` [N, T] float,
    1 on real tokens; ``sampler_logp`` [N, T], 0 on padding; ``truncated`` [N] (no stop token within
    max_new_tokens); completions decoded without special tokens; ``policy_version`` [N] = version.
    Tensors go to ``device`` (default: CPU).
    """
    B = len(prompts)
    if len(groups) != B or len(rows) != B or prompt_ids.shape[0] != B:
        raise ValueError(f"{B} prompts, {len(rows)} rows, {len(groups)} groups of completions and "
                         f"{prompt_ids.shape[0]} prompt rows: they must all match.")
    G = len(groups[0]) if groups else 0
    if any(len(g) != G for g in groups) or (B and G == 0):
        raise ValueError(f"every prompt needs the same number of completions; got {[len(g) for g in groups]}.")
    flat = [c for g in groups for c in g]
    N, T = B * G, max((len(c.token_ids) for c in flat), default=0)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    completion_ids = torch.full((N, T), pad, dtype=torch.long)
    mask = torch.zeros(N, T)
    logp = torch.zeros(N, T)
    truncated = torch.zeros(N, dtype=torch.bool)
    for i, c in enumerate(flat):
        L = len(c.token_ids)
        if len(c.logprobs) != L:
            raise ValueError(f"completion {i}: {L} tokens but {len(c.logprobs)} log-probs.")
        if L:
            completion_ids[i, :L] = torch.tensor(c.token_ids, dtype=torch.long)
            mask[i, :L] = 1.0
            logp[i, :L] = torch.tensor(c.logprobs, dtype=torch.float32)
        truncated[i] = _truncated(c, eos)
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    batch = RolloutBatch(
        prompt_ids=prompt_ids.repeat_interleave(G, 0), prompt_mask=prompt_mask.repeat_interleave(G, 0),
        completion_ids=completion_ids, mask=mask, sampler_logp=logp, truncated=truncated, group_size=G,
        prompts=[p for p in prompts for _ in range(G)], completions=completions,
        rows=[r for r in rows for _ in range(G)], policy_version=torch.full((N,), int(version), dtype=torch.long),
    )
    if device is not None:
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "mask", "sampler_logp", "truncated", "policy_version"):
            setattr(batch, name, getattr(batch, name).to(device))
    return batch


def _truncated(c: Completion, eos: int) -> bool:
    if c.finish_reason == "length":
        return True
    if c.finish_reason == "stop":
        return False
    if c.finish_reason is None:
        return not (c.token_ids and c.token_ids[-1] == eos)
    raise ValueError(f"vLLM ended a completion with finish_reason={c.finish_reason!r} (expected 'stop' or 'length'); "
                     "the request was aborted or failed.")


def completion_from_vllm(output) -> Completion:
    """A ``Completion`` from a ``vllm.CompletionOutput`` (``token_ids``, ``logprobs``: one entry per
    token mapping token id -> ``Logprob``, ``finish_reason``)."""
    ids = [int(t) for t in output.token_ids]
    entries = output.logprobs
    if entries is None or len(entries) != len(ids):
        raise RuntimeError("vLLM returned no per-token log-probs (SamplingParams.logprobs must be set).")
    return Completion(ids, [_sampled_logprob(e, t) for e, t in zip(entries, ids)], output.finish_reason)


def _sampled_logprob(entry, token_id: int) -> float:
    value = entry[token_id]
    return float(getattr(value, "logprob", value))


def completion_from_openai(choice: dict) -> Completion:
    """A ``Completion`` from one choice of a ``/v1/completions`` answer: token ids from
    ``token_ids`` (``return_token_ids``) or from ``logprobs.tokens`` written as ``token_id:<id>``
    (``return_tokens_as_token_ids``), log-probs from ``logprobs.token_logprobs``."""
    lp = choice.get("logprobs") or {}
    ids = choice.get("token_ids")
    if ids is None:
        ids = [_token_id(t) for t in lp.get("tokens") or []]
    logps = lp.get("token_logprobs")
    if logps is None or len(logps) != len(ids) or any(x is None for x in logps):
        raise VLLMServerError("the vLLM server's completion has no log-prob for every sampled token (the request asks "
                              "for logprobs=0; is 'rollout.vllm_url' a vLLM server?).")
    return Completion([int(t) for t in ids], [float(x) for x in logps], choice.get("finish_reason"))


def _token_id(token: str) -> int:
    if not (isinstance(token, str) and token.startswith("token_id:")):
        raise VLLMServerError(f"the vLLM server returned the token {token!r} as text, not as 'token_id:<id>' "
                              "(it must honor return_tokens_as_token_ids; vLLM >= 0.10 does).")
    return int(token.split(":", 1)[1])


def sampling_args(spec: SamplingSpec, seed: int) -> dict:
    """The sampling fields shared by ``vllm.SamplingParams`` and ``/v1/completions``: G samples,
    ``seed``, the lmpo temperature / top-p / top-k (0 = off), max_tokens, and the log-prob of each
    sampled token (``logprobs=0``: the sampled token only)."""
    return dict(n=spec.group_size, seed=int(seed), temperature=float(spec.temperature), top_p=float(spec.top_p),
                top_k=int(spec.top_k) if spec.top_k and spec.top_k > 0 else 0, max_tokens=int(spec.max_new_tokens),
                logprobs=0)


# ----------------------------------------------------------------------------- trainer weights


def _hf_module(model):
    """The transformers ``PreTrainedModel`` whose ``save_pretrained`` writes the (merged) weights."""
    model = unwrap_ddp(model)
    return model.get_base_model() if hasattr(model, "peft_config") else model


def save_weights(model: torch.nn.Module, tokenizer, path: Path, main: bool = True) -> None:
    """Write ``model``'s merged HF weights (safetensors), config and tokenizer into ``path`` (replaced
    whole: written beside it, then renamed). Every rank calls this; only ``main`` writes."""
    weights = hf_weights(model)
    if not main:
        return
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained_as_hf(_hf_module(model), tmp, weights)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _dist():
    """(is main rank, barrier): rank 0 and a barrier under torch.distributed, else (True, no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank() == 0, dist.barrier
    return True, lambda: None


# ----------------------------------------------------------------------------- the engine


class VLLMEngine:
    """The ``RolloutEngine`` backed by vLLM (colocated in this process, or a server).

    ``update_weights`` only remembers the newest module and version; the weights reach vLLM right
    before the next ``generate``, and only when the version changed since the last push."""

    name = "vllm"

    def __init__(self, backend, tokenizer, device=None):
        self.backend, self.tokenizer, self.device = backend, tokenizer, device
        self.version = 0                      # optimizer steps of the weights vLLM holds
        self._pending: tuple[torch.nn.Module, int] | None = None

    @classmethod
    def from_config(cls, cfg, model_dir, tokenizer) -> "VLLMEngine":
        """The engine ``rollout.vllm_mode`` names, for the model in ``model_dir``."""
        r = cfg.rollout
        device = resolve_device(cfg.device)
        if r.vllm_mode == "colocate":
            max_len = cfg.max_prompt_len + cfg.max_new_tokens if cfg.max_prompt_len else None
            backend = ColocatedVLLM(str(model_dir), str(cfg.tokenizer or model_dir), r.vllm_gpu_memory_utilization,
                                    dtype=cfg.dtype, seed=cfg.seed, max_model_len=max_len)
        elif r.vllm_mode == "server":
            sync = Path(r.vllm_sync_dir) if r.vllm_sync_dir else Path(cfg.output_dir) / "vllm_weights"
            backend = VLLMServer(r.vllm_url, sync, tokenizer)
        else:
            raise ConfigError(f"config key 'rollout.vllm_mode': unknown mode '{r.vllm_mode}' (choose colocate or server).")
        return cls(backend, tokenizer, device)

    def generate(self, prompts: list[str], rows: list[dict], seeds: list[int], spec: SamplingSpec) -> RolloutBatch:
        """G completions per prompt (grouped, prompt-major) from vLLM; ``seeds[j]`` drives prompt j's group."""
        if len(seeds) != len(prompts) or len(rows) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts need as many rows and seeds; got {len(rows)} and {len(seeds)}.")
        ids, mask = encode_prompts(self.tokenizer, prompts, spec.max_prompt_len)
        token_ids = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        pending = self._pending
        groups = self.backend.sample(token_ids, seeds, spec, new_weights=pending)
        if pending is not None:
            self.version, self._pending = pending[1], None
        return to_rollout_batch(self.tokenizer, prompts, rows, groups, ids, mask, self.version, self.device)

    def update_weights(self, model: torch.nn.Module, version: int) -> None:
        """Remember the trainer's module after ``version`` optimizer steps (pushed before the next generate)."""
        self._pending = None if version == self.version else (model, int(version))


class ColocatedVLLM:
    """A ``vllm.LLM`` in this process with sleep mode: asleep (level 1) except while generating."""

    def __init__(self, model_dir: str, tokenizer_dir: str, gpu_memory_utilization: float, dtype: str = "float32",
                 seed: int = 0, max_model_len: int | None = None):
        try:
            import vllm
        except ImportError as e:
            raise ConfigError(f"config key 'rollout.engine' is vllm but vLLM is not installed ({e}): {INSTALL} "
                              "(it needs a CUDA GPU), or set rollout.engine: builtin.") from None
        if not torch.cuda.is_available():
            raise ConfigError("config key 'rollout.engine' is vllm with rollout.vllm_mode: colocate, but torch sees no "
                              "CUDA GPU here; use rollout.vllm_mode: server with a vLLM server elsewhere, or "
                              "rollout.engine: builtin.")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("config key 'rollout.vllm_mode': colocate runs one vLLM inside a single training process; "
                              "with several processes (torchrun) use rollout.vllm_mode: server.")
        # the engine core in this process, so that the trainer's tensors can be handed to the model directly
        if os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            raise ConfigError("rollout.vllm_mode: colocate needs vLLM's engine in this process: unset "
                              "VLLM_ENABLE_V1_MULTIPROCESSING (or set it to 0).")
        kw = dict(model=model_dir, tokenizer=tokenizer_dir, dtype=dtype, seed=seed, enable_sleep_mode=True,
                  gpu_memory_utilization=gpu_memory_utilization, logprobs_mode="processed_logprobs")
        if max_model_len:
            kw["max_model_len"] = max_model_len
        try:
            self.llm = vllm.LLM(**kw)
        except TypeError as e:
            if "logprobs_mode" in str(e):
                raise ConfigError(f"rollout.engine: vllm needs vLLM >= 0.10.1 (LLM(logprobs_mode=...)); found "
                                  f"{getattr(vllm, '__version__', '?')}: {INSTALL} --upgrade.") from None
            raise
        self.SamplingParams = vllm.SamplingParams
        self.llm.sleep(level=1)               # the trainer has the GPU until the first generate

    def sample(self, prompt_ids: list[list[int]], seeds: list[int], spec: SamplingSpec,
               new_weights: tuple[torch.nn.Module, int] | None = None) -> list[list[Completion]]:
        """Wake up (first loading ``new_weights`` = (trainer module, version) when given), generate G
        completions per prompt, sleep. Returns one list of G ``Completion`` per prompt."""
        try:
            if new_weights is not None:
                self.llm.wake_up(tags=["weights"])    # no KV cache yet: the copy has the memory
                self._load(new_weights[0])
                self.llm.wake_up(tags=["kv_cache"])
                self.llm.reset_prefix_cache()         # cached prefixes were computed with the old weights
            else:
                self.llm.wake_up()
            params = [self.SamplingParams(**sampling_args(spec, s)) for s in seeds]
            outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=params,
                                     use_tqdm=False)
        finally:
            self.llm.sleep(level=1)
        return [[completion_from_vllm(c) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]

    def _load(self, model: torch.nn.Module) -> None:
        """Copy the trainer's weights into vLLM's model, tensor by tensor (vLLM fuses q/k/v etc. itself)."""
        self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights=iter_hf_weights(model)))


class VLLMServer:
    """A running vLLM OpenAI-compatible server: ``/v1/completions`` for samples; ``save_pretrained``
    into the sync directory and the dev-mode ``/collective_rpc`` for weights."""

    def __init__(self, url: str, sync_dir: Path, tokenizer, timeout: float = HTTP_TIMEOUT_S):
        self.url, self.tokenizer, self.timeout = url.rstrip("/"), tokenizer, timeout
        self.sync_dir = Path(sync_dir).resolve()     # the server resolves paths from its own directory
        models = (self._request("GET", "/v1/models") or {}).get("data") or []
        if not models:
            raise VLLMServerError(f"the vLLM server at {self.url} (config key 'rollout.vllm_url') serves no model.")
        self.model = models[0]["id"]

    def _request(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:400].decode(errors="replace")
            raise VLLMServerError(f"the vLLM server at {self.url} (config key 'rollout.vllm_url') answered {method} "
                                  f"{path} with HTTP {e.code}: {detail}", status=e.code) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise VLLMServerError(f"cannot reach the vLLM server at {self.url} (config key 'rollout.vllm_url'): "
                                  f"{reason}. Is `vllm serve` running there?") from None
        return json.loads(raw) if raw.strip() else None

    def sample(self, prompt_ids: list[list[int]], seeds: list[int], spec: SamplingSpec,
               new_weights: tuple[torch.nn.Module, int] | None = None) -> list[list[Completion]]:
        """Reload ``new_weights`` = (trainer module, version) when given, then one ``/v1/completions``
        request per prompt (n = G, its seed), sent concurrently. Returns one list of G ``Completion``
        per prompt."""
        if new_weights is not None:
            self.load(*new_weights)
        if not prompt_ids:
            return []
        with ThreadPoolExecutor(max_workers=min(len(prompt_ids), MAX_CONCURRENT_REQUESTS)) as pool:
            return list(pool.map(lambda a: self._complete(*a, spec), zip(prompt_ids, seeds)))

    def _complete(self, ids: list[int], seed: int, spec: SamplingSpec) -> list[Completion]:
        body = dict(model=self.model, prompt=ids, **sampling_args(spec, seed), stream=False,
                    return_tokens_as_token_ids=True, return_token_ids=True,
                    # explicit, so the model's generation_config.json cannot change the distribution
                    repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0)
        choices = sorted((self._request("POST", "/v1/completions", body) or {}).get("choices") or [],
                         key=lambda c: c.get("index", 0))
        if len(choices) != spec.group_size:
            raise VLLMServerError(f"the vLLM server at {self.url} returned {len(choices)} completions for a prompt, "
                                  f"not n={spec.group_size}.")
        return [completion_from_openai(c) for c in choices]

    def load(self, model: torch.nn.Module, version: int) -> None:
        """Write the trainer's merged weights into ``<sync dir>/step_<version>`` and have the server
        reload them in place; older weight directories are removed afterwards. Every rank calls this
        (FSDP gathers the weights); rank 0 writes and asks, the others wait."""
        main, barrier = _dist()
        path = self.sync_dir / f"step_{version}"
        if main:
            self.sync_dir.mkdir(parents=True, exist_ok=True)
        save_weights(model, self.tokenizer, path, main=main)
        if main:
            self.reload(str(path))
            for old in self.sync_dir.glob("step_*"):
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
        barrier()

    def reload(self, path: str) -> None:
        """Have the server load the HF checkpoint at ``path`` into its model in place, and forget its
        cached prefixes. Newer vLLM takes the path in ``reload_weights``; older (>= 0.10) first points
        the model config at it (``update_config``) and reloads from there."""
        try:
            self._rpc("reload_weights", kwargs={"weights_path": path})
        except VLLMServerError as first:
            if first.status == 404:
                raise VLLMServerError(f"the vLLM server at {self.url} (config key 'rollout.vllm_url') has no "
                                      "/collective_rpc endpoint: start it with VLLM_SERVER_DEV_MODE=1 so lmpo can "
                                      "reload the trained weights (see docs/vllm.md).", status=404) from None
            try:
                self._rpc("update_config", args=[{"model_config": {"model": path}}])
                self._rpc("reload_weights")
            except VLLMServerError as e:
                raise VLLMServerError(f"the vLLM server at {self.url} could not reload the weights in {path}: {e} "
                                      f"(first attempt, reload_weights(weights_path=...): {first})", status=e.status) from None
        self._request("POST", "/reset_prefix_cache")

    def _rpc(self, method: str, args: list | None = None, kwargs: dict | None = None):
        body = {"method": method, "timeout": self.timeout}
        if args:
            body["args"] = args
        if kwargs:
            body["kwargs"] = kwargs
        return self._request("POST", "/collective_rpc", body)
