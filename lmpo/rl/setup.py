"""Everything the loop needs, built from a ``Config``: the ``Run`` and its typed parts (the actor:
policy, tokenizer, optimizer; the reference; the critic; the data; the reward sources; iterative
GRPO's state; the counters; the rollout side).

The loop (``rl/loop.py``) reads top to bottom; construction, resumption and checkpoint plumbing live here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmpo.algorithms import overlong_buffer_tokens
from lmpo.config import Config, ConfigError, resolved_preset, to_dict, validate
from lmpo.data import addition_heldout, load_rows, render_prompt
from lmpo.data.datasets import check_prompt_lengths
from lmpo.data.tasks import ADDITION
from lmpo.models.load import ModelError, _looks_like_hub_id, context_length, load_causal_lm, load_tokenizer, resolve_device
from lmpo.stages.embedded import embedded_model
from lmpo.parallel import torchrun as D
from lmpo.io.checkpoint import find_checkpoint, load_state, rng_state, save_checkpoint, set_rng_state
from lmpo.rewards.combine import resolve_reward_funcs
from lmpo.rewards.reward_model import RewardModelScorer
from lmpo.rewards.remote import RemoteReward
from lmpo.models.load import resolve_model
from lmpo.models.value import param_bytes
from lmpo.rl.critic import Critic, NoCritic, make_critic
from lmpo.rl.iterative import Iterative


class PromptStream:
    """Dataset rows in a fresh seeded shuffle each epoch; its position is part of the checkpoint."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed, self.epoch, self.pos = rows, seed, 0, 0
        self._perm = self._shuffle()

    def _shuffle(self):
        perm = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(perm)
        return perm

    def take(self, k: int) -> list[tuple[int, dict]]:
        out = []
        while len(out) < k:
            if self.pos == len(self._perm):
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._shuffle()
            i = self._perm[self.pos]
            out.append((i, self.rows[i]))
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict):
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._shuffle()


@dataclass(frozen=True)
class Algorithm:
    """The resolved algorithm the loop reads: a preset's choices (``lmpo.algorithms.PRESET_KEYS``) with
    the config's overrides, and the options that are not part of presets."""

    advantage: str                  # key of lmpo.algorithms.ADVANTAGES
    ratio_level: str                # "token" | "sequence"
    eps_low: float
    eps_high: float
    dual_clip: float | None
    loss_agg: str                   # key of lmpo.algorithms.AGGREGATIONS
    kl_placement: str               # "loss" | "reward" | "none"
    kl_estimator: str               # "k1" | "k2" | "k3"
    unbiased_kl: bool
    whiten_advantages: bool
    critic: str | None              # None | "separate" | "shared"
    dynamic_sampling: bool
    overlong_buffer: int            # tokens ("auto" resolved against max_new_tokens)
    overlong_penalty: float
    max_extra_rounds: int
    adv_eps: float
    gamma: float
    lam: float
    off_policy_delta: float | None
    keep_sampling_mask: bool
    keep_routing: bool
    tis_cap: float | None
    max_len: int                    # constant normalizer of seq-mean-token-sum-norm


def resolve_algorithm(cfg: Config) -> Algorithm:
    """The preset named by ``cfg.algorithm`` with ``cfg.algo`` / ``cfg.ppo.critic`` overrides applied,
    plus the options that are not part of presets (DeepSeek-V3.2 corrections, GAE settings).
    Its checks live in ``lmpo.config`` (``resolved_preset``)."""
    algo = resolved_preset(cfg)
    for k in ("max_extra_rounds", "adv_eps", "gamma", "lam", "off_policy_delta", "keep_sampling_mask",
              "keep_routing", "tis_cap"):
        algo[k] = getattr(cfg.algo, k)
    if algo["tis_cap"] is None and (cfg.rollout.engine != "builtin" or cfg.distributed.max_staleness > 0):
        algo["tis_cap"] = 2.0   # another engine, or stale (async) rollouts: correct the sampler/trainer mismatch
    algo["max_len"] = cfg.algo.max_len or cfg.max_new_tokens
    algo["overlong_buffer"] = overlong_buffer_tokens(algo["overlong_buffer"], cfg.max_new_tokens)
    return Algorithm(**algo)


@dataclass
class Rewards:
    """The reward sources ((name, callable) pairs, in config order) with their weights, and each
    source's run of batches on which it gave nothing (``reward_fail_steps``; checkpointed)."""

    sources: list
    weights: list
    fail_streaks: dict = field(default_factory=dict)


@dataclass
class Actor:
    """The policy and what trains it: the model (HF; LoRA-wrapped, compiled or FSDP-sharded as the
    config asks), its tokenizer, its AdamW (a shared value head's parameters included) and
    learning-rate schedule, and the directory its weights came from (the base model with LoRA)."""

    model: torch.nn.Module
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    model_dir: str


@dataclass
class Data:
    """The rows a run reads: the training prompts' seeded stream (its position is checkpointed), the
    held-out rows, PPO-ptx's (prompt, completion) pairs, and the longest prompt allowed."""

    prompts: PromptStream
    eval_rows: list | None = None
    ptx_rows: list | None = None
    max_prompt_len: int | None = None


@dataclass
class Counters:
    """What a step carries to the next besides weights and optimizers; a checkpoint resumes it."""

    step: int = 0                           # optimizer steps done
    beta: float = 0.0                       # the KL coefficient (adaptive with ppo.kl_target)
    skipped_in_a_row: int = 0               # non-finite optimizer steps in a row (max_skipped_steps)
    monitor: dict = field(default_factory=dict)     # lmpo.rl.monitors' histories, streaks, fired alarms


@dataclass
class Rollout:
    """Who generates and who scores, set by ``rl.loop.attach`` (or the Ray backend's worker pools)."""

    engine: object = None                   # the rollout engine (lmpo.rollout.engine)
    scorer: object = None                   # batch -> reward stats: rl.score here, or Ray reward workers
    prefetch: object = None                 # asynchronous collection ahead of the learner (Ray, max_staleness > 0)
    closers: list = field(default_factory=list)

    def close(self):
        """Stop what was attached (background collection, worker actors)."""
        while self.closers:
            self.closers.pop()()


@dataclass
class Run:
    """A run's state in parts, each with one owner: the config and resolved algorithm; where this
    process runs; the actor (policy, tokenizer, optimizer, schedule); the reference; the critic
    (``lmpo.rl.critic``: a ``Critic`` or a ``NoCritic``); the data; the reward sources; iterative
    GRPO's state (``lmpo.rl.iterative``); the counters a checkpoint resumes; what ``attach`` sets."""

    cfg: Config
    algo: Algorithm
    device: torch.device
    actor: Actor
    ref: torch.nn.Module | None
    critic: Critic | NoCritic
    data: Data
    rewards: Rewards
    world: D.World = field(default_factory=D.World)
    iterative: Iterative = field(default_factory=Iterative)
    counters: Counters = field(default_factory=Counters)
    rollout: Rollout = field(default_factory=Rollout)

    @property
    def use_ref(self) -> bool:
        return self.ref is not None or (self.cfg.lora_r > 0 and self.counters.beta > 0
                                        and self.algo.kl_placement != "none")

    @property
    def optimizers(self) -> list:
        """The policy's optimizer first, then a separate critic's."""
        return [self.actor.optimizer, *self.critic.optimizers()]

    def trained_parameters(self) -> list:
        return [*self.actor.model.parameters(), *self.critic.parameters()]

    def state_bytes(self) -> dict:
        """Bytes each trained model holds (parameters, gradients, optimizer state), for summary.json."""
        state = {"policy": param_bytes(self.actor.model, self.actor.optimizer), **self.critic.state_bytes()}
        if self.ref is not None:
            state["reference"] = param_bytes(self.ref)
        return state

    def extra_state(self) -> dict:
        """What the checkpoint keeps under "extra" (the key earlier versions wrote): the counters
        besides step and β, each reward source's failure streak, iterative GRPO's state."""
        c = self.counters
        return {"skipped_in_a_row": c.skipped_in_a_row, "reward_fail_streaks": self.rewards.fail_streaks,
                "monitor": c.monitor, **self.iterative.state()}

    def load_extra_state(self, extra: dict):
        self.counters.skipped_in_a_row = extra.get("skipped_in_a_row", 0)
        self.rewards.fail_streaks = extra.get("reward_fail_streaks", {})
        self.counters.monitor = extra.get("monitor", {})
        self.iterative.load(extra)


def reward_sources(cfg: Config):
    """(sources, weights): the reward functions, then the reward model, then the reward URL."""
    sources = resolve_reward_funcs(list(cfg.reward_funcs))
    if cfg.reward_model:
        try:
            sources.append(("reward_model", RewardModelScorer(cfg.reward_model)))
        except (OSError, ValueError) as e:
            raise ModelError(f"reward_model '{cfg.reward_model}' could not be loaded as a reward model: {e}") from None
    if cfg.reward_url:
        sources.append(("reward_url", RemoteReward(cfg.reward_url)))
    weights = list(cfg.reward_weights) if cfg.reward_weights is not None else [1.0] * len(sources)

    return sources, [float(w) for w in weights]


def _lr_lambda(warmup: int, schedule: str = "constant", total: int = 0):
    """Linear warmup, then constant or cosine: lr_t = lr · ½(1 + cos(π·(t − warmup)/(total − warmup)))."""
    def f(step):
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
        return 1.0
    return f


CGROUP = Path("/sys/fs/cgroup")


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by its cgroup's CPU quota
    (quota / period, rounded up)."""
    import math
    import os

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(n, math.ceil(quota)) if quota else n)


def cgroup_cpu_quota() -> float | None:
    """CPUs' worth of time the cgroup grants (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``); None when unlimited or unknown."""
    try:
        own = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        own = []
    v2 = [CGROUP / line.split("::", 1)[1].lstrip("/") / "cpu.max" for line in own if line.startswith("0::")]
    for path in [*v2, CGROUP / "cpu.max"]:
        try:
            quota, period = path.read_text().split()
            break
        except (OSError, ValueError):
            continue
    else:
        try:
            quota = (CGROUP / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (CGROUP / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)


def configure_threads(cfg) -> int:
    """torch's CPU threads: ``threads`` when set, else OMP_NUM_THREADS when set (torch reads it), else
    the CPUs this process may use (a container's quota or a taskset mask, not the machine's cores)."""
    import os

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(usable_cpus())
    return torch.get_num_threads()


def runnable_now(samples: int = 10, interval: float = 0.01) -> float | None:
    """Tasks runnable right now besides this process's own thread: the kernel's ``procs_running``
    (/proc/stat) averaged over ``samples`` reads ``interval`` s apart, minus one; None without /proc/stat."""
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat") as f:
                counts += [int(line.split()[1]) for line in f if line.startswith("procs_running ")]
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return max(0.0, sum(counts) / len(counts) - 1) if counts else None


def warn_if_oversubscribed(threads: int):
    """A warning when this run's torch threads (more than one) and the work already running exceed the
    usable CPUs by half: torch's threads then wait on each other at every parallel region and a step can
    be many times slower (one thread only shares). The work running is the 1-minute load average, or the
    tasks runnable right now where fewer (the load average still counts a run that has just ended)."""
    import os
    import warnings

    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return
    cpus = usable_cpus()
    over = lambda busy: threads > 1 and busy >= 1 and busy + threads > 1.5 * cpus     # noqa: E731
    if not over(load):
        return
    now = runnable_now()                                    # 0.1 s, only when the minute's average says so
    if now is not None and not over(now):
        return
    seen = f"load average {load:.1f}" + ("" if now is None else f", {now:.1f} tasks runnable now")
    warnings.warn(f"the CPUs are oversubscribed: {seen} on {cpus} usable CPUs, and this run adds "
                  f"{threads} torch threads. Steps may be many times slower; use fewer threads (config key "
                  "'threads' or OMP_NUM_THREADS, e.g. threads=1) or wait for the other work to finish.", stacklevel=2)


def setup(cfg: Config, resume: bool = False) -> Run:
    validate(cfg)                                                   # the config alone, before anything is loaded
    threads = configure_threads(cfg)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    world = D.init(cfg)                                             # torchrun: join the process group
    if world.main:
        warn_if_oversubscribed(threads)
    device = resolve_device(cfg.device)
    algo = resolve_algorithm(cfg)
    rows, eval_rows, ptx_rows = load_data(cfg)                     # bad data and reward specs fail before
    sources, weights = reward_sources(cfg)                          # any model is built or loaded
    cfg.model = resolve_model(cfg.model)                            # a packaged name (smollm2): its HF directory
    if cfg.model and not Path(cfg.model).exists() and not _looks_like_hub_id(cfg.model):
        raise ModelError(f"model '{cfg.model}' does not exist: give a local HF model directory (config.json + "
                         "weights) or leave 'model' unset for the embedded tiny model.")
    model_dir = str(cfg.model) if cfg.model else str(embedded_model(progress=cfg.progress))
    ckpt = find_checkpoint(cfg.output_dir) if resume else None    # none yet: step 0 (the run's guard says so)
    # with LoRA the checkpoint holds the adapter only: the base is model_dir, the adapter is resumed
    policy_dir = str(ckpt / "policy") if ckpt and not cfg.lora_r else model_dir
    tokenizer = load_tokenizer(cfg.tokenizer or (str(ckpt / "policy") if ckpt else model_dir))
    policy = load_causal_lm(policy_dir, device)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
        policy.config.use_cache = False
    if cfg.lora_r:
        policy = _add_lora(policy, cfg.lora_r, adapter=ckpt / "policy" if ckpt else None)
    policy = D.prepare_model(policy, world)                         # ddp: rank 0's weights; fsdp: sharded
    if cfg.compile:
        policy.compile(dynamic=True)                                # in place: the module, its state dict, unchanged
    need_ref = cfg.beta > 0 and algo.kl_placement != "none"
    ref = None
    if need_ref and not cfg.lora_r:  # with LoRA the reference is the base with the adapter disabled
        ref_dir = str(ckpt / "ref") if ckpt and (ckpt / "ref").exists() else model_dir
        ref = D.prepare_model(load_causal_lm(ref_dir, device, trainable=False), world, trainable=False)
    critic = make_critic(cfg, algo.critic, policy, model_dir, tokenizer, device, world, ckpt)
    params = [p for p in policy.parameters() if p.requires_grad] + critic.shared_parameters()   # a shared head's
    optimizer = make_optimizer(cfg, params, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, cfg.lr_schedule, cfg.max_steps * cfg.epochs * cfg.minibatches))
    max_prompt_len = prompt_room(cfg, context_length(policy), rows, tokenizer)
    run = Run(cfg=cfg, algo=algo, device=device, actor=Actor(policy, tokenizer, optimizer, scheduler, model_dir),
              ref=ref, critic=critic, data=Data(PromptStream(rows, cfg.seed), eval_rows, ptx_rows, max_prompt_len),
              rewards=Rewards(sources, weights), world=world, iterative=Iterative.from_config(cfg),
              counters=Counters(beta=cfg.beta))
    if ckpt:
        _restore(run, ckpt)
    for opt in run.optimizers:
        allocate_state(opt)
    return run


def make_optimizer(cfg: Config, params: list, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``params``; ``fused_adamw`` asks for torch's fused kernel, which a torch without one for
    this device refuses (CPU: torch < 2.4) with an error that names the key."""
    try:
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=cfg.fused_adamw or None)
    except RuntimeError as e:
        if not cfg.fused_adamw:
            raise
        raise ConfigError(f"config key 'fused_adamw': torch {torch.__version__} has no fused AdamW for {device.type} "
                          f"parameters ({e}); set fused_adamw=false.") from e


def allocate_state(opt: torch.optim.Optimizer):
    """AdamW's moments allocated now, as its first step would (zeros, step 0; a resumed state is
    kept), rather than at the end of step 1: there they land in the heap between the freed
    activations of that step, which the next steps' activations then cannot reuse as one block (a
    PPO process on the embedded model peaked ~10 MiB higher). The same numbers: torch's own lazy
    initialization (``_init_group``) does the work, given zero gradients that are dropped after.
    Optimizers other than torch's Adam family, or a torch whose private signature differs, allocate
    lazily as before."""
    if not isinstance(opt, torch.optim.Adam) or not hasattr(opt, "_init_group"):
        return
    for group in opt.param_groups:
        params = [p for p in group["params"] if p.requires_grad and p.grad is None and not opt.state[p]]
        for p in params:
            p.grad = torch.zeros_like(p)
        try:
            opt._init_group(group, [], [], [], [], [], [])
        except TypeError:                          # another torch's signature: lazily, as torch does
            pass
        finally:
            for p in params:
                p.grad = None


def load_data(cfg: Config) -> tuple[list, list | None, list | None]:
    """(training prompts, held-out rows or None, PPO-ptx pairs or None), each checked as it loads."""
    rows = load_rows(cfg.dataset, required=("prompt",))
    eval_rows = None
    if cfg.eval_dataset:
        eval_rows = load_rows(cfg.eval_dataset, required=("prompt",), what="eval_dataset")[: cfg.eval_samples]
    elif cfg.dataset == ADDITION:
        eval_rows = addition_heldout(cfg.eval_samples)
    ptx_rows = load_rows(cfg.ppo.ptx_dataset or cfg.dataset, required=("prompt", "completion"),
                         what="ppo.ptx_dataset") if cfg.ppo.ptx_coef > 0 else None
    return rows, eval_rows, ptx_rows


def prompt_room(cfg: Config, ctx: int | None, rows: list, tokenizer) -> int | None:
    """The longest prompt allowed (``max_prompt_len``, else the model's context ``ctx`` less
    ``max_new_tokens``); every training prompt is checked against it."""
    max_prompt_len = cfg.max_prompt_len or (ctx - cfg.max_new_tokens if ctx else None)
    if max_prompt_len is not None:
        if max_prompt_len <= 0:
            raise ConfigError(f"config key 'max_new_tokens' ({cfg.max_new_tokens}) leaves no room for a prompt in the "
                              f"model's context of {ctx} tokens.")
        check_prompt_lengths([render_prompt(r["prompt"], tokenizer, i) for i, r in enumerate(rows)], tokenizer,
                             max_prompt_len, name=str(cfg.dataset))
    return max_prompt_len


def _add_lora(policy, r: int, adapter=None):
    """A LoRA adapter of rank r on every linear layer (through peft), or the one saved in ``adapter``."""
    try:
        from peft import LoraConfig, PeftModel, get_peft_model
    except ImportError as e:  # pragma: no cover
        raise ConfigError("config key 'lora_r' needs peft: pip install 'lmpo[lora]'") from e
    if adapter is not None:
        return PeftModel.from_pretrained(policy, str(adapter), is_trainable=True)
    return get_peft_model(policy, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0))


def checkpoint(run: Run, crashing: bool = False):
    """Written by rank 0 in the single-process format (any world size resumes it); every rank calls
    this (fsdp gathers weights and optimizer state), except on a crash, where only a rank that can
    save alone does."""
    if crashing and not D.can_save_alone(run.world):
        return None
    actor = run.actor
    states = {"optimizer": D.optimizer_state(actor.model, actor.optimizer, run.world),
              "scheduler": actor.scheduler.state_dict(), "prompts": run.data.prompts.state(),
              "beta": run.counters.beta, "extra": run.extra_state()}
    states.update(run.critic.state())
    models = {"policy": D.saveable(run.world, actor.model), **run.critic.saved_models()}
    if run.ref is not None and run.cfg.iterative.ref_reset_steps:
        models["ref"] = run.ref
    if not run.world.main:
        return None
    return save_checkpoint(run.cfg.output_dir, run.counters.step, models=models, states=states,
                           tokenizer=actor.tokenizer, meta={"config": to_dict(run.cfg), "model_dir": actor.model_dir})


def step_mark(run: Run) -> dict:
    """What a step changes before its update: the prompt stream, the RNG states, the counters' lists."""
    return {"prompts": run.data.prompts.state(), "rng": rng_state(), "beta": run.counters.beta,
            "extra": {k: list(v) if isinstance(v, list) else v for k, v in run.extra_state().items()}}


def rewind(run: Run, mark: dict):
    """Back to the start of the step ``mark`` was taken at (its update had not begun)."""
    run.data.prompts.load(mark["prompts"])
    set_rng_state(mark["rng"])
    run.counters.beta = mark["beta"]
    run.load_extra_state(mark["extra"])


def _restore(run: Run, ckpt: Path):
    states, meta = load_state(ckpt)
    D.load_optimizer_state(run.actor.model, run.actor.optimizer, run.world, states["optimizer"])
    run.actor.scheduler.load_state_dict(states["scheduler"])
    run.critic.load(states)
    run.data.prompts.load(states["prompts"])
    run.counters.beta = states["beta"]
    run.load_extra_state(states.get("extra", {}))
    run.counters.step = meta["step"]
    set_rng_state(states["rng"])
