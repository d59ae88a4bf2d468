"""One dataclass tree for every knob, each field documented once (the text becomes ``--help``).

Values come from defaults, then a YAML file, then dotted ``key=value`` overrides
(``algo.eps_high=0.28``). Unknown keys and bad values are errors that name the key, say what is
allowed and suggest the nearest known key. ``validate`` is the one place a config is checked, before
anything heavy is loaded; its choice lists (algorithm presets, advantage estimators, loss aggregations,
KL estimators) come from the registries in ``lmpo.algorithms``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lmpo.errors import ConfigError  # noqa: F401 (its home is lmpo.errors; imported from here too)
from .algorithms import PRESET_KEYS, PRESETS, preset_choices, resolve_preset


def opt(default, help: str, choices=None):
    """A documented field; ``choices`` restricts the values: a list, or a function returning one
    (read when a value is checked or ``--help`` is printed, so registries can grow)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, "choices": choices})
    return field(default=default, metadata={"help": help, "choices": choices})


def _preset_choices(key: str, none: bool = True):
    """The allowed values of preset key ``key`` from lmpo.algorithms' registries (with None = the preset's value)."""
    return lambda: ([None] if none else []) + list(preset_choices(key))



TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # report_to: each is also the name of its extra

@dataclass
class AlgoConfig:
    """The algorithm's independent choices. ``None`` takes the value of the preset named by
    ``algorithm``; anything set here overrides it."""

    advantage: str | None = opt(None, "advantage estimator (registered in lmpo.algorithms.ADVANTAGES)", _preset_choices("advantage"))
    ratio_level: str | None = opt(None, "importance ratio per token, or per sequence (GSPO)", _preset_choices("ratio_level"))
    eps_low: float | None = opt(None, "lower clip range: rho >= 1 - eps_low")
    eps_high: float | None = opt(None, "upper clip range: rho <= 1 + eps_high (clip-higher when > eps_low)")
    dual_clip: float | None = opt(None, "dual-clip constant c > 1 bounding the loss of negative advantages at -c*A")
    loss_agg: str | None = opt(None, "loss aggregation (registered in lmpo.algorithms.AGGREGATIONS)", _preset_choices("loss_agg"))
    kl_placement: str | None = opt(None, "where the KL to the reference goes", _preset_choices("kl_placement"))
    kl_estimator: str | None = opt(None, "KL estimator", _preset_choices("kl_estimator"))
    unbiased_kl: bool | None = opt(None, "DeepSeek-V3.2: weight the k3 KL by pi_theta/pi_old so its gradient is unbiased")
    whiten_advantages: bool | None = opt(None, "whiten advantages over the batch's real tokens")
    dynamic_sampling: bool | None = opt(None, "DAPO: drop groups whose rewards are all equal and sample more prompts")
    overlong_buffer: int | None = opt(None, "DAPO soft overlong punishment buffer in tokens (0 = off)")
    overlong_penalty: float | None = opt(None, "DAPO overlong penalty at the maximum length")
    max_extra_rounds: int = opt(4, "dynamic sampling: at most this many extra rollout rounds per step")
    max_len: int | None = opt(None, "constant normalizer of seq-mean-token-sum-norm (default: max_new_tokens)")
    adv_eps: float = opt(1e-4, "epsilon in the group-normalized advantage's denominator")
    gamma: float = opt(1.0, "GAE discount")
    lam: float = opt(0.95, "GAE lambda")
    off_policy_delta: float | None = opt(None, "DeepSeek-V3.2 off-policy sequence masking threshold delta >= 0 (None = off)")
    keep_sampling_mask: bool = opt(False, "DeepSeek-V3.2: record the top-p/top-k support at sampling and compute pi_old and pi_theta over it")
    keep_routing: bool = opt(False, "DeepSeek-V3.2: replay the MoE experts chosen at sampling in the training forward")
    tis_cap: float | None = opt(None, "truncated importance sampling cap between the sampler's and the trainer's log-probs (None = off)")


@dataclass
class PPOConfig:
    """Critic and reward-side KL settings (used by presets with a critic or KL in the reward)."""

    critic: str | None = opt(None, "value model: a separate copy with a scalar head, or a head on the policy's backbone", _preset_choices("critic", none=False))
    critic_init: str = opt("policy", "initialize a separate critic from 'policy' or from a reward model directory")
    critic_learning_rate: float | None = opt(None, "critic learning rate (default: learning_rate x 5)")
    critic_warmup_steps: int = opt(0, "value-only steps before the policy moves: the critic fits the SFT policy's returns first")
    vf_coef: float = opt(0.5, "value loss coefficient")
    value_clip: float | None = opt(0.2, "value clipping range around the old values (None = unclipped)")
    kl_target: float | None = opt(None, "adaptive KL controller target (None = fixed beta)")
    kl_horizon: int = opt(10000, "adaptive KL controller horizon in samples")
    ptx_coef: float = opt(0.0, "PPO-ptx: coefficient of a language-modelling loss on ptx_dataset")
    ptx_dataset: str | None = opt(None, "PPO-ptx dataset with prompt and completion columns (or text)")


@dataclass
class IterativeConfig:
    """Iterative GRPO (DeepSeekMath Algorithm 1)."""

    ref_reset_steps: int = opt(0, "every K steps reset the reference model to the current policy (0 = never)")
    rm_retrain: bool = opt(False, "continue training the reward model on new policy samples at each reset")
    rm_replay: float = opt(0.1, "fraction of historical preference data replayed when retraining the reward model")


@dataclass
class RolloutConfig:
    """Which engine generates the rollouts."""

    engine: str = opt("builtin", "rollout engine: the built-in KV-cache sampler, or vLLM (pip install 'lmpo[vllm]', a GPU)", ["builtin", "vllm"])
    dtype: str = opt("float32", "builtin engine: generate with the trained weights, or with a bfloat16 copy refreshed after each optimizer step (memory-bound decoding reads half the bytes; +2 bytes per parameter)", ["float32", "bfloat16"])
    vllm_mode: str = opt("colocate", "vLLM in this process, asleep while training ('colocate'), or a running vLLM server ('server')", ["colocate", "server"])
    vllm_url: str | None = opt(None, "vllm_mode=server: the server's base URL, e.g. http://host:8000 (started with VLLM_SERVER_DEV_MODE=1 so weights can be reloaded)")
    vllm_gpu_memory_utilization: float = opt(0.3, "vllm_mode=colocate: fraction of GPU memory vLLM may take")
    vllm_sync_dir: str | None = opt(None, "vllm_mode=server: directory shared with the server where updated weights are written (default: output_dir/vllm_weights)")


@dataclass
class DistributedConfig:
    """Multi-process training: torchrun (DDP / FSDP2), or Ray actors for rollout, reward and learner."""

    strategy: str = opt("none", "data parallel strategy", ["none", "ddp", "fsdp"])
    nproc: int = opt(1, "processes to launch with torchrun when strategy is ddp or fsdp")
    backend: str = opt("torch", "'torch': one process or torchrun; 'ray': rollout workers, reward workers and the learner as Ray actors (pip install 'lmpo[ray]')", ["torch", "ray"])
    rollout_workers: int = opt(2, "ray: rollout worker actors (each holds a copy of the policy)")
    reward_workers: int = opt(1, "ray: reward worker actors")
    max_staleness: int = opt(0, "ray: 0 = synchronous; K >= 1 = asynchronous, rollouts from a policy at most K updates old (turns on algo.tis_cap = 2 unless set)")
    ray_address: str | None = opt(None, "ray: address of an existing cluster (default: start a local one)")
    ray_num_cpus: int | None = opt(None, "ray: CPUs of the local cluster (default: one per actor)")
    ray_rollout_gpus: float = opt(0.0, "ray: GPUs per rollout worker (0 = the worker samples on CPU)")
    ray_timeout_s: float = opt(600.0, "ray: seconds to wait for a rollout or reward before giving up with an error")
    worker_restarts: int = opt(1, "ray: times a dead rollout or reward worker is restarted (its work resubmitted) before the run stops")


@dataclass
class EnvConfig:
    """Multi-turn episodes with an environment (docs/environments.md); unset = single-turn prompts."""

    name: str | None = opt(None, "environment: a built-in (addition_retry, addition_chain), 'module:Class' or 'file.py:Class' (lmpo or TRL-style); its rewards reach the loss through the reward function env_reward (or env_turns)")
    max_turns: int = opt(4, "at most this many model turns per episode")
    max_tokens: int = opt(64, "at most this many completion tokens per episode, the model's and the environment's together (max_new_tokens bounds one model turn)")
    nonresettable_groups: str = opt("refuse", "an environment that cannot be reset to the same state with a group baseline (GRPO, RLOO, ...): refuse, or allow the G episodes of one row, from different states, as the group", ["refuse", "allow"])


@dataclass
class MonitorConfig:
    """Alarms for collapse, drift and reward hacking, checked every step (docs/monitoring.md). A
    threshold set to null turns its alarm off; every signal is still logged as monitor/*."""

    enabled: bool = opt(True, "compute the monitor/* signals and check the alarms")
    action: str = opt("warn", "an alarm warns (and is written to alarms.jsonl), or stops the run with exit 2 after a checkpoint", ["warn", "stop"])
    warmup_steps: int = opt(20, "no alarm before this step (trends compare against the first `window` steps after it)")
    window: int = opt(20, "steps averaged for trends: the first window after warmup against the latest window")
    patience: int = opt(5, "a condition must hold this many consecutive steps to raise its alarm")
    min_distinct_frac: float | None = opt(0.13, "collapse: mean fraction of distinct completions per group below this (with G = 8 the least possible is 0.125: every group one string)")
    max_group_similarity: float | None = opt(None, "collapse: mean pairwise token-bigram Jaccard similarity within groups above this")
    min_entropy: float | None = opt(0.02, "collapse: mean token entropy (nats) below this")
    max_zero_std_frac: float | None = opt(None, "collapse: fraction of groups whose rewards are all equal above this")
    max_kl_start: float | None = opt(2.0, "drift: KL(start || policy) per token on a fixed probe of start-policy samples above this (computed even when beta = 0)")
    kl_every: int = opt(10, "drift: probe KL every this many steps")
    probe_size: int = opt(32, "drift: rows of the first batch kept as the KL probe")
    max_length_ratio: float | None = opt(2.5, "drift: latest-window mean completion length over the first window's above this (or below its inverse)")
    max_truncated_frac: float | None = opt(0.5, "drift: latest-window truncation rate above this")
    verifier: str | None = opt(None, "hacking: a reward function (e.g. addition_exact) scored on every batch as the ground truth the training reward should track; its gain is compared with the training reward's")
    max_reward_divergence: float | None = opt(1.0, "hacking: training-reward gain minus verifier gain, each in its first-window per-sample std units, above this")
    max_eval_drop: float | None = opt(0.15, "hacking: held-out eval accuracy this far below its best while the training reward is at or above its level then")
    max_component_drop: float | None = opt(0.25, "hacking: a reward function's latest-window mean this far below its first window while the total reward rose")


@dataclass
class Config:
    """``lmpo train``: RL fine-tuning of a causal language model."""

    model: str | None = opt(None, "HF model directory (default: the embedded tiny model, SFT-warmed if sft_dir is set)")
    tokenizer: str | None = opt(None, "tokenizer directory (default: the model's)")
    dataset: str = opt("addition", "prompt dataset: jsonl/json/parquet/csv/saved HF dataset with a 'prompt' column, or 'addition'")
    eval_dataset: str | None = opt(None, "held-out dataset for evaluation (default for 'addition': its held-out set)")
    reward_funcs: list = opt(["addition_exact"], "reward functions: built-in names, 'module:function' or 'file.py:function'")
    reward_weights: list | None = opt(None, "weights of the reward sources in order (reward_funcs, then reward_model, then reward_url); default 1 each")
    reward_model: str | None = opt(None, "reward model directory (AutoModelForSequenceClassification) used as a reward source")
    reward_url: str | None = opt(None, "HTTP endpoint used as a reward source (POST JSON batches)")
    reward_errors: str = opt("skip", "a reward function failing on a sample: skip the sample (no gradient, logged) or raise", ["skip", "raise"])
    reward_workers: int = opt(4, "threads computing reward functions concurrently")
    reward_timeout_s: float = opt(300.0, "seconds a reward function may take on one batch; past it, that batch counts as failed for it")
    reward_fail_steps: int = opt(3, "stop (exit 2) when a reward source fails or returns None on every sample of this many consecutive steps (0 = never)")
    algorithm: str = opt("grpo", "preset of algorithm choices (registered in lmpo.algorithms.PRESETS)", lambda: list(PRESETS))
    group_size: int = opt(8, "G: samples per prompt")
    prompts_per_step: int = opt(8, "prompts per RL step (a step has prompts_per_step x group_size samples)")
    max_steps: int = opt(100, "RL steps")
    learning_rate: float = opt(1e-5, "policy learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(0, "linear learning-rate warmup steps")
    lr_schedule: str = opt("constant", "after warmup: constant, or cosine decay to 0 at max_steps (lets a noisy policy gradient settle)", ["constant", "cosine"])
    beta: float = opt(0.04, "KL coefficient (0: no reference model is loaded)")
    epochs: int = opt(1, "mu: update epochs over each rollout batch")
    minibatches: int = opt(1, "optimizer steps per epoch (the batch is split into this many minibatches)")
    micro_batch_size: int | None = opt(None, "rows per forward/backward (gradient accumulation); default: whole minibatch")
    max_grad_norm: float | None = opt(1.0, "gradient clipping norm (None = off)")
    max_skipped_steps: int = opt(3, "an optimizer step with a non-finite loss or gradient is skipped (metric train/skipped_steps); this many in a row stop the run with exit status 2, keeping the checkpoint from before")
    max_new_tokens: int = opt(8, "maximum completion length")
    max_prompt_len: int | None = opt(None, "maximum prompt length in tokens (default: model context - max_new_tokens)")
    temperature: float = opt(1.0, "sampling temperature (log-probs in training use the same temperature)")
    top_p: float = opt(1.0, "nucleus sampling")
    top_k: int = opt(0, "top-k sampling (0 = off)")
    old_logp: str = opt("auto", "pi_old: 'auto' (detached current log-probs when there is one optimizer step per rollout, else recompute), 'recompute', or 'sampler' (the rollout's log-probs)", ["auto", "recompute", "sampler"])
    seed: int = opt(0, "random seed")
    output_dir: str = opt("runs/grpo", "where metrics, samples, checkpoints and the final model go")
    overwrite_output_dir: bool = opt(False, "a fresh run (no --resume) into an output_dir holding an earlier run: false = refuse, true = remove that run's files and start anew")
    save_steps: int = opt(50, "checkpoint every N steps (and always at the end)")
    eval_steps: int = opt(0, "held-out evaluation every N steps (0 = only at the end)")
    eval_reward_funcs: list | None = opt(None, "reward functions that score held-out evaluation (default: the outcome reward sources); e.g. [addition_exact] when training on process rewards")
    eval_samples: int = opt(200, "held-out rows used by evaluation")
    eval_samples_per_row: int = opt(1, "sampled completions per held-out row; n > 1 also reports pass@k for k = 1, 2, 4, ..., n (unbiased estimator, Chen et al. 2021)")
    log_samples: int = opt(2, "sample completions written to samples.jsonl per step")
    tensorboard: bool = opt(False, "also log metrics to TensorBoard in output_dir/tb")
    report_to: list = opt([], "experiment trackers that also get every step's metrics, each local by default: tensorboard, wandb (offline, output_dir/wandb), mlflow (file store output_dir/mlruns), trackio (its local database); each is an extra: pip install 'lmpo[wandb]'")
    progress: bool = opt(True, "show a progress bar with the live reward")
    dtype: str = opt("float32", "training and rollout precision (bf16 uses autocast)", ["float32", "bfloat16"])
    device: str = opt("auto", "cpu, cuda, or auto")
    threads: int | None = opt(None, "torch CPU threads (default: OMP_NUM_THREADS, else the CPUs this process may use: affinity mask and cgroup quota)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    compile: bool = opt(False, "torch.compile the policy (dynamic shapes; the first steps pay the compilation)")
    fused_adamw: bool = opt(False, "the policy's AdamW as one fused kernel (transformers' and TRL's default): ~3x faster steps on CPU, no full-size temporaries; last-bit differences from torch's default implementation")
    padding_free: bool = opt(False, "training forward without padding: completions packed into one sequence (each group's prompt once, a block mask); same values up to float rounding, less compute when lengths differ")
    lora_r: int = opt(0, "LoRA rank through peft (0 = full fine-tuning); the reference is the base with the adapter off")
    algo: AlgoConfig = field(default_factory=AlgoConfig, metadata={"help": "algorithm choices (override the preset)"})
    ppo: PPOConfig = field(default_factory=PPOConfig, metadata={"help": "critic and reward-KL settings"})
    iterative: IterativeConfig = field(default_factory=IterativeConfig, metadata={"help": "iterative GRPO"})
    rollout: RolloutConfig = field(default_factory=RolloutConfig, metadata={"help": "rollout engine"})
    distributed: DistributedConfig = field(default_factory=DistributedConfig, metadata={"help": "multi-process training"})
    env: EnvConfig = field(default_factory=EnvConfig, metadata={"help": "multi-turn environment"})
    monitor: MonitorConfig = field(default_factory=MonitorConfig, metadata={"help": "collapse, drift and reward-hacking alarms"})


@dataclass
class SFTConfig:
    """``lmpo sft``: supervised fine-tuning on (prompt, completion) pairs, loss on completion tokens only."""

    model: str | None = opt(None, "HF model directory (default: a freshly built embedded tiny model)")
    tokenizer: str | None = opt(None, "tokenizer directory (default: the model's)")
    dataset: str = opt("addition", "jsonl/json/parquet/csv/saved HF dataset with prompt and completion columns, or 'addition'")
    max_steps: int = opt(300, "optimizer steps")
    batch_size: int = opt(64, "pairs per step")
    learning_rate: float = opt(3e-3, "AdamW learning rate (cosine decay after warmup)")
    warmup_steps: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float | None = opt(1.0, "gradient clipping norm")
    seed: int = opt(0, "random seed")
    eval_steps: int = opt(0, "every N steps, greedy exact match of the completion column on eval_rows validation rows (0 = never)")
    eval_rows: int = opt(200, "validation rows held out from the training rows for eval_steps")
    stop_at_accuracy: float | None = opt(None, "stop early once validation accuracy reaches this (needs eval_steps)")
    output_dir: str = opt("runs/sft", "where the model and tokenizer are saved")
    device: str = opt("auto", "cpu, cuda, or auto")
    threads: int | None = opt(None, "torch CPU threads")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class RMConfig:
    """``lmpo rm``: a reward model from (prompt, chosen, rejected[, margin]) pairs."""

    model: str | None = opt(None, "causal-LM directory (a new scalar head, e.g. an `lmpo sft` output), reward-model directory (continued), or 'tiny' (a fresh random tiny model); default: the embedded tiny model after its SFT warm start (built once and cached, as for `lmpo train`)")
    tokenizer: str | None = opt(None, "tokenizer directory (default: the model's)")
    dataset: str = opt("addition", "jsonl/json/parquet/csv/saved HF dataset with prompt, chosen, rejected (and optional margin) columns, or 'addition'")
    eval_dataset: str | None = opt(None, "held-out pairs (default: 'addition' uses pairs on its held-out prompts; other datasets split off eval_fraction)")
    eval_fraction: float = opt(0.05, "fraction of the dataset held out for evaluation when eval_dataset is not set")
    eval_pairs: int = opt(400, "held-out pairs evaluated (at most)")
    max_steps: int = opt(600, "optimizer steps")
    batch_size: int = opt(64, "preference pairs per step")
    learning_rate: float = opt(3e-4, "AdamW learning rate (cosine decay after warmup); for a pretrained model of 0.5B+ parameters use ~1e-5")
    warmup_steps: int = opt(30, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    max_grad_norm: float | None = opt(1.0, "gradient clipping norm (None = off)")
    max_length: int | None = opt(None, "truncate prompt+response to this many tokens, keeping the end (default: the tokenizer's limit)")
    log_steps: int = opt(10, "record the training loss every N steps")
    seed: int = opt(0, "random seed")
    output_dir: str = opt("runs/rm", "where the reward model, tokenizer and metrics.json go")
    device: str = opt("auto", "cpu, cuda, or auto")
    threads: int | None = opt(None, "torch CPU threads (default: torch's)")
    progress: bool = opt(True, "show a progress bar")


# ----------------------------------------------------------------------------- loading


def _fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value, tp, key: str, choices):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return _check_choice(None, key, choices)
        inner = [a for a in args if a is not type(None)]
        tp = inner[0] if len(inner) == 1 else tp
        origin = typing.get_origin(tp)
    try:
        if tp is bool or tp == "bool":
            if isinstance(value, bool):
                out = value
            elif str(value).lower() in ("true", "1", "yes", "on"):
                out = True
            elif str(value).lower() in ("false", "0", "no", "off"):
                out = False
            else:
                raise ValueError
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            out = int(value)
        elif tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        elif tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            out = str(value)
        elif tp is list or origin is list:
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                value = [value]
            out = list(value)
        else:
            out = value
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"config key '{key}' must be {name}, got {value!r}.") from None
    return _check_choice(out, key, choices)


def _choices(f: dataclasses.Field):
    """The allowed values of field ``f`` now (None: any value of its type)."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def _check_choice(value, key, choices):
    if choices is not None and value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"config key '{key}' has the value {value!r}; allowed values: {allowed}.")
    return value


def _all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls`` (sections expanded)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _unknown(key: str, known, root=None) -> ConfigError:
    """An unknown key, with the nearest known key in the same section, or the same name in
    another section (``eps_high`` -> ``algo.eps_high``)."""
    parts = key.split(".")
    near = difflib.get_close_matches(parts[-1], list(known), n=1)
    guess = ".".join(parts[:-1] + [near[0]]) if near else None
    if guess is None and root is not None:
        every = _all_keys(root)
        same_leaf = [k for k in every if k.split(".")[-1] == parts[-1]]
        close = same_leaf or difflib.get_close_matches(key, every, n=1, cutoff=0.75)
        guess = close[0] if close else None
    hint = f" Did you mean '{guess}'?" if guess else ""
    cmd = {"SFTConfig": "sft", "RMConfig": "rm"}.get(getattr(root, "__name__", ""), "train")
    return ConfigError(f"unknown config key '{key}'.{hint} Run `lmpo {cmd} --help` for the keys.")


def _apply(obj, data: dict, prefix: str = "", root=None):
    root = root or type(obj)
    fields = _fields(type(obj))
    hints = typing.get_type_hints(type(obj))
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top level>'}' must be a mapping of keys to values.")
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not isinstance(key, str) or key not in fields:
            raise _unknown(str(full), fields, root)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give it a mapping of its keys.")
            _apply(getattr(obj, key), value, prefix=f"{full}.", root=root)
        else:
            setattr(obj, key, _coerce(value, tp, full, _choices(fields[key])))


def parse_overrides(items) -> dict:
    """``['a=1', 'algo.eps_high=0.28']`` -> nested dict; values parsed as YAML scalars."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (for example learning_rate=1e-5).")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(path=None, overrides=(), cls=Config, base: dict | None = None):
    """Build a ``cls`` from defaults, then ``base``, then the YAML at ``path``, then overrides."""
    cfg = cls()
    if base:
        _apply(cfg, base)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file '{path}' does not exist.")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of keys to values.")
        _apply(cfg, data)
    _apply(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def validate(cfg):
    """Range and consistency checks; each error names the key and the allowed range."""
    for key, value in _numbers(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number, got {value}.")
    if isinstance(cfg, Config):
        _check_ranges(cfg)
        _check_algo(cfg)
        _check_sources(cfg)
        resolved_preset(cfg)
        _check_rewards(cfg)
        _check_parallel(cfg)
        _check_rollout(cfg)
    if isinstance(cfg, SFTConfig):
        for key in ("max_steps", "batch_size", "learning_rate", "threads", "max_grad_norm"):
            _positive(key, getattr(cfg, key), strict=key != "max_steps")
        for key in ("warmup_steps", "weight_decay"):
            _positive(key, getattr(cfg, key), strict=False)
    if isinstance(cfg, RMConfig):
        for key in ("batch_size", "learning_rate", "log_steps", "eval_pairs"):
            _positive(key, getattr(cfg, key))
        for key in ("max_steps", "warmup_steps"):
            _positive(key, getattr(cfg, key), strict=False)
        if not 0 <= cfg.eval_fraction < 1:
            raise ConfigError(f"config key 'eval_fraction' must be in [0, 1), got {cfg.eval_fraction}.")
        if cfg.max_length is not None and cfg.max_length < 2:
            raise ConfigError(f"config key 'max_length' must be >= 2, got {cfg.max_length}.")
    return cfg


def _positive(key, value, strict=True):
    if value is not None and (value <= 0 if strict else value < 0):
        raise ConfigError(f"config key '{key}' must be {'> 0' if strict else '>= 0'}, got {value}.")


def _check_ranges(cfg: Config):
    """The RL config's counts, sizes and rates; the trackers named in report_to."""
    for key in ("group_size", "prompts_per_step", "max_new_tokens", "epochs", "minibatches", "learning_rate",
                "temperature", "save_steps", "eval_samples", "eval_samples_per_row", "reward_workers", "micro_batch_size",
                "threads",
                "max_prompt_len", "max_grad_norm", "reward_timeout_s", "max_skipped_steps"):
        _positive(key, getattr(cfg, key))
    for key in ("max_steps", "beta", "top_k", "warmup_steps", "weight_decay", "eval_steps", "log_samples", "lora_r",
                "reward_fail_steps"):
        _positive(key, getattr(cfg, key), strict=False)
    for name in cfg.report_to:
        if name not in TRACKERS:
            raise ConfigError(f"config key 'report_to' has {name!r}; allowed: {', '.join(TRACKERS)}.")
        import importlib.util

        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"config key 'report_to' names {name!r}, which is not installed: "
                              f"pip install 'lmpo[{name}]'.")
    if not 0 < cfg.top_p <= 1:
        raise ConfigError(f"config key 'top_p' must be in (0, 1], got {cfg.top_p}.")


def _check_algo(cfg: Config):
    """The algo section's ranges, the environment's and the monitors' sizes, minibatches dividing the batch."""
    for key in ("eps_low", "eps_high", "max_len", "overlong_penalty", "tis_cap", "off_policy_delta"):
        _positive(f"algo.{key}", getattr(cfg.algo, key), strict=key not in ("eps_low", "eps_high", "overlong_penalty", "off_policy_delta"))
    _positive("algo.overlong_buffer", cfg.algo.overlong_buffer, strict=False)
    if cfg.algo.overlong_buffer is not None and cfg.algo.overlong_buffer > cfg.max_new_tokens:
        raise ConfigError(f"config key 'algo.overlong_buffer' ({cfg.algo.overlong_buffer}) must be at most "
                          f"max_new_tokens ({cfg.max_new_tokens}): the soft overlong punishment ramps over the "
                          "last overlong_buffer tokens of the budget.")
    for key in ("adv_eps", "max_extra_rounds"):
        _positive(f"algo.{key}", getattr(cfg.algo, key), strict=key == "adv_eps")
    for key in ("gamma", "lam"):
        if not 0 <= getattr(cfg.algo, key) <= 1:
            raise ConfigError(f"config key 'algo.{key}' must be in [0, 1], got {getattr(cfg.algo, key)}.")
    for key in ("env.max_turns", "env.max_tokens", "monitor.window", "monitor.patience", "monitor.kl_every",
                "monitor.probe_size"):
        _positive(key, getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]))
    if cfg.algo.dual_clip is not None and cfg.algo.dual_clip <= 1:
        raise ConfigError(f"config key 'algo.dual_clip' must be > 1, got {cfg.algo.dual_clip}.")
    n = cfg.prompts_per_step * cfg.group_size
    if n % cfg.minibatches:
        raise ConfigError(f"config key 'minibatches' ({cfg.minibatches}) must divide prompts_per_step x group_size ({n}).")


def _check_sources(cfg: Config):
    """At least one reward source, and one finite weight per source when weights are given."""
    if not cfg.reward_funcs and cfg.reward_model is None and cfg.reward_url is None:
        raise ConfigError("config key 'reward_funcs' is empty and there is no reward_model or reward_url: "
                          "give at least one reward source.")
    if cfg.reward_weights is not None:
        n_src = len(cfg.reward_funcs) + (cfg.reward_model is not None) + (cfg.reward_url is not None)
        if len(cfg.reward_weights) != n_src:
            raise ConfigError(f"config key 'reward_weights' has {len(cfg.reward_weights)} weights for {n_src} reward sources "
                              "(reward_funcs, then reward_model, then reward_url).")
        for w in cfg.reward_weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"config key 'reward_weights' must be a list of numbers, got {w!r} in "
                                  f"{cfg.reward_weights!r}.")


# Checks that need a loaded model, tokenizer or dataset stay where those are loaded: the dataset's
# columns and prompt lengths (lmpo.data, rl/setup.py), the model's context length and a model
# directory that does not exist (rl/setup.py), the reward model's loading (rl/setup.py), and
# what the machine provides (Ray and vLLM installed, a CUDA GPU, the torchrun world size).


def resolved_preset(cfg: Config) -> dict:
    """The preset ``cfg.algorithm`` with the ``cfg.algo`` / ``cfg.ppo.critic`` overrides applied
    (lmpo.algorithms.resolve_preset), and the combinations the loop cannot train refused."""
    overrides = {k: getattr(cfg.algo, k) for k in PRESET_KEYS if hasattr(cfg.algo, k)}
    overrides["critic"] = cfg.ppo.critic
    try:
        algo = resolve_preset(cfg.algorithm, **overrides)
    except ValueError as e:
        raise ConfigError(f"config key 'algorithm' / 'algo': {e}") from None
    if algo["advantage"] == "gae" and algo["critic"] is None:
        raise ConfigError("config: the 'gae' advantage needs a critic; set ppo.critic to 'separate' or 'shared'.")
    if cfg.group_size == 1 and algo["advantage"] in ("group_norm", "group_mean", "batch_norm", "leave_one_out"):
        raise ConfigError(f"config key 'group_size' is 1, but the advantage '{algo['advantage']}' (algorithm "
                          f"'{cfg.algorithm}') compares the samples of a group: every advantage would be 0 and "
                          "nothing would train. Set group_size >= 2 or another algo.advantage.")
    if cfg.lora_r and cfg.iterative.ref_reset_steps and cfg.beta > 0 and algo["kl_placement"] != "none":
        raise ConfigError("config keys 'lora_r' and 'iterative.ref_reset_steps' cannot be combined: with LoRA the "
                          "reference is the base model with the adapter switched off, which a reset cannot move. "
                          "Train without LoRA (lora_r=0) or set iterative.ref_reset_steps=0.")
    return algo


def _check_rewards(cfg: Config):
    if cfg.iterative.rm_retrain and (not cfg.reward_model or not cfg.reward_funcs):
        raise ConfigError("config key 'iterative.rm_retrain' needs a reward_model to retrain and at least one reward "
                          "function (a verifier) in reward_funcs to label the new preference pairs.")


def _check_parallel(cfg: Config):
    """torchrun (when ``nproc`` > 1 launches it) and Ray."""
    d = cfg.distributed
    if d.max_staleness and d.backend != "ray":
        raise ConfigError("config key 'distributed.max_staleness' needs distributed.backend=ray (asynchronous "
                          "rollouts come from Ray rollout workers).")
    if d.strategy != "none" and d.nproc > 1:
        check_world(cfg, d.nproc)
    if d.backend != "ray":
        return
    if d.strategy != "none":
        raise ConfigError(f"config key 'distributed.backend' is 'ray' with distributed.strategy={d.strategy}: "
                          "use one or the other (the Ray learner trains in one process).")
    if d.rollout_workers < 1 or d.reward_workers < 1:
        raise ConfigError("config keys 'distributed.rollout_workers' and 'distributed.reward_workers' must be >= 1 "
                          f"(got {d.rollout_workers} and {d.reward_workers}).")
    if d.max_staleness < 0:
        raise ConfigError(f"config key 'distributed.max_staleness' must be >= 0 (got {d.max_staleness}).")
    if cfg.rollout.engine != "builtin":
        raise ConfigError(f"config key 'rollout.engine' is '{cfg.rollout.engine}' with distributed.backend=ray: Ray "
                          "rollout workers use the built-in engine; use rollout.engine=builtin.")
    if cfg.iterative.rm_retrain:
        raise ConfigError("config key 'iterative.rm_retrain' is not supported with distributed.backend=ray: the reward "
                          "model lives in the reward workers.")


def check_world(cfg: Config, size: int):
    """What ``size`` torchrun processes need (called again by train/distributed.py with the real world size)."""
    d = cfg.distributed
    if d.strategy == "none":
        raise ConfigError(f"started by torchrun with {size} processes but config key 'distributed.strategy' is "
                          "'none'; set it to 'ddp' or 'fsdp'.")
    if cfg.prompts_per_step % size:
        raise ConfigError(f"config key 'prompts_per_step' ({cfg.prompts_per_step}) must be divisible by the number of "
                          f"processes ({size}): each rank takes whole groups.")
    if resolved_preset(cfg)["dynamic_sampling"]:
        raise ConfigError("dynamic sampling (algorithm 'dapo' / algo.dynamic_sampling) is not supported with "
                          f"distributed.strategy={d.strategy}: ranks would keep different numbers of groups; "
                          "set algo.dynamic_sampling=false.")
    if cfg.iterative.rm_retrain:
        raise ConfigError("config key 'iterative.rm_retrain' is not supported with several processes: each rank "
                          "would retrain its own reward model on its own samples.")
    if d.strategy == "fsdp":
        for key, bad in (("lora_r", cfg.lora_r > 0), ("ppo.critic", cfg.ppo.critic is not None),
                         ("iterative.ref_reset_steps", bool(cfg.iterative.ref_reset_steps))):
            if bad:
                raise ConfigError(f"config key '{key}' is not supported with distributed.strategy=fsdp yet; "
                                  "use distributed.strategy=ddp.")


def _check_rollout(cfg: Config):
    """vLLM: what it cannot record, and what server mode needs (an installed vLLM and a GPU are checked when it starts)."""
    r = cfg.rollout
    if r.engine != "vllm":
        return
    if cfg.algo.keep_sampling_mask:
        raise ConfigError("config key 'algo.keep_sampling_mask' is not supported with rollout.engine: vllm (vLLM does "
                          "not report the top-p/top-k support of each sampled token); set it to false or use "
                          "rollout.engine: builtin.")
    if cfg.algo.keep_routing:
        raise ConfigError("config key 'algo.keep_routing' is not supported with rollout.engine: vllm (vLLM does not "
                          "report the MoE experts chosen for each token); set it to false or use rollout.engine: builtin.")
    if r.vllm_mode == "server" and not r.vllm_url:
        raise ConfigError("config key 'rollout.vllm_url' is required with rollout.vllm_mode: server "
                          "(the base URL of a running vLLM server, e.g. http://localhost:8000).")


def _numbers(cfg, prefix: str = ""):
    """(dotted key, value) of every float-valued key (sections expanded)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield f"{prefix}{f.name}", value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def help_text(cls=Config, prefix: str = "") -> str:
    """One line per key: name, default and documentation, sections expanded."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"\n  [{prefix}{f.name}] {f.metadata.get('help', '')}")
            lines.append(help_text(hints[f.name], prefix=f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = _choices(f)
        extra = f" {{{', '.join(str(c) for c in choices if c is not None)}}}" if choices else ""
        lines.append(f"  {prefix}{f.name} = {default!r}{extra}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
