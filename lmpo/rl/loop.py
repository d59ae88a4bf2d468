"""THE loop. PPO, GRPO and the family are the same five stages; an algorithm is a preset of choices
(``lmpo.algorithms.presets``) that picks pure functions at each stage:

    prompts ─► rollout ─► reward ─► prepare (old/ref log-probs, values, KL-in-reward, advantages, masks)
            ─► update (μ epochs × minibatches) ─► log, checkpoint, evaluate
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from lmpo.errors import DivergedError  # noqa: F401 (its home is lmpo.errors; imported from here too)
from lmpo import algorithms as A
from lmpo.config import Config, ConfigError, to_dict
from lmpo.data import render_prompt
from lmpo.rollout import RolloutBatch
from lmpo.rollout.engine import BuiltinEngine, RolloutEngine, SamplingSpec
from lmpo.rollout.vllm_engine import VLLMEngine
from lmpo.parallel import torchrun as D
from lmpo.rl.forward import completion_logp
from lmpo.io.checkpoint import no_space
from lmpo.io.logging import MetricsLogger
from lmpo.rl.monitors import Monitors
from lmpo.io.rundir import guard, no_space_error
from lmpo.rl.setup import Rewards, Run, checkpoint, rewind, setup, step_mark
from lmpo.io.stop import Interrupted, StopSignals
from lmpo.rollout.env import make_env_engine
from lmpo.rewards.combine import CallPolicy, RewardLogs, TrainerState, call_all, check_arguments, compute_rewards, describe, reward_inputs, watch_total_failure
from lmpo.rewards.process import is_process_reward
from lmpo.rl.iterative import Iterative
from lmpo.rewards.errors import RewardError
from lmpo.stages.sft import completion_nll, encode_pairs
from lmpo.stages.evaluate import eval_sources, held_out_accuracy


class Timer(dict):
    """Accumulates seconds per named phase: ``with t("rollout"): ...``."""

    @contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        yield
        self[name] = self.get(name, 0.0) + time.perf_counter() - t0


def train(cfg: Config, resume: bool = False, workers=None) -> dict:
    """Run RL in this process; returns the last step's metrics (plus held-out accuracy when there is
    an eval set). A full disk anywhere is an ``OutputError`` naming the file; the last checkpoint
    stays. ``workers``: set by the Ray backend, whose learner actor runs this loop: a function that
    attaches its rollout and reward worker pools to the run (its driver holds the output lock).
    ``lmpo.launch.train`` picks the backend; this function is the loop for every one of them."""
    if cfg.distributed.backend == "ray" and workers is None:
        raise ConfigError("distributed.backend=ray runs through lmpo.launch.train (what `lmpo train` calls), "
                          "which starts the Ray actors; lmpo.rl.loop.train is the loop inside them.")
    try:
        with guard(cfg, resume) if workers is None else nullcontext():   # output_dir checked and locked first
            with StopSignals(ray_learner=workers is not None) as stop:
                return loop(cfg, resume, stop, workers)
    except BaseException as e:
        if no_space(e):
            raise no_space_error(cfg, e) from None
        raise


def start(cfg: Config, resume: bool = False, workers=None) -> Run:
    """A run ready to step: ``setup`` (models, data, optimizers, resume), then ``attach`` (who
    generates and who scores)."""
    run = setup(cfg, resume=resume)
    attach(run, workers)
    return run


def loop(cfg: Config, resume: bool, stop: StopSignals, workers=None) -> dict:
    run = start(cfg, resume, workers)                               # models, data, rollout engine and scorer
    log = open_log(run)
    metrics: dict = {}
    monitor = Monitors.for_run(run)                                 # collapse, drift and reward-hacking alarms
    t_start = time.perf_counter()
    mark = signum = None
    try:
        while run.step < cfg.max_steps and not (signum := stop.requested(run)):   # SIGINT / SIGTERM: between steps
            mark = step_mark(run)                                   # a failure before the update rewinds to here
            t = Timer()
            t0 = time.perf_counter()
            batch, roll_stats = collect(run, t)                     # rollout + reward
            with t("logprob"):
                prep_stats = prepare(run, batch, t)                 # old/ref log-probs, values, advantages
            mark = None                                             # the update changes the weights: no way back
            upd_stats = update(run, batch, t)                       # μ epochs × minibatches
            run.step += 1
            with t("weights_sync"):
                run.engine.update_weights(run.policy, run.step)      # free when the engine shares the module
            metrics = {**roll_stats, **prep_stats, **upd_stats, **step_times(t, time.perf_counter() - t0)}
            metrics = D.reduce_metrics(run, metrics)                # over ranks (the same dict on every rank)
            adapt_kl(run, metrics)
            iterative_reset(run, metrics)
            if cfg.eval_steps and run.step % cfg.eval_steps == 0 and run.eval_rows:
                metrics.update(evaluate_policy(run))
            monitor.watch(run, batch, metrics)                      # monitor/* signals; alarms warn or mark a stop
            log.log(run.step, metrics, samples(batch, cfg.log_samples))
            save_if_due(run, monitor)
        if signum or (signum := stop.requested(run)):               # a checkpoint of the last whole step, then exit
            raise Interrupted(signum, run.step, checkpoint(run) if run.step else None)
    except BaseException as e:
        if mark is not None and run.step > 0 and not no_space(e):  # e.g. a worker died during the rollout
            rewind(run, mark)
            checkpoint(run, crashing=True)                          # the last whole step: resumes to the same run
        elif isinstance(e, DivergedError) and run.step > 0 and weights_finite(run, collective=False):
            checkpoint(run, crashing=True)                          # the skipped steps left the last good weights
        raise
    finally:
        log.close()
        run.close()
    check_finite_weights(run)
    save_final(run)
    if run.eval_rows and "eval/greedy_accuracy" not in metrics:     # not when the last step just evaluated
        metrics.update(evaluate_policy(run))
    if run.world.main:
        write_summary(run, metrics, time.perf_counter() - t_start)
    D.finish(run)
    return metrics


def open_log(run: Run):
    """config.json and the metrics logger (rank 0 writes; other ranks get a logger that drops everything)."""
    cfg, out = run.cfg, Path(run.cfg.output_dir)
    if not run.world.main:
        return D.NullLog()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    return MetricsLogger(out, cfg.tensorboard, cfg.progress, total=cfg.max_steps, initial=run.step,
                         desc=cfg.algorithm, report_to=cfg.report_to, config=to_dict(cfg))


def save_if_due(run: Run, monitor):
    """A checkpoint every ``save_steps`` and at the last step, and when a monitor alarm with
    ``monitor.action=stop`` is pending: the whole step is saved, then the alarm stops the run (exit 2)."""
    if run.step % run.cfg.save_steps == 0 or run.step == run.cfg.max_steps or monitor.pending:
        check_finite_weights(run)
        checkpoint(run)
    monitor.enforce()


# ----------------------------------------------------------------------------- rollout + reward


def attach(run: Run, workers=None):
    """Who generates and who scores: the engine named by ``rollout.engine`` and ``score`` in this
    process, or what ``workers`` attaches (the Ray backend: pools of rollout and reward actors)."""
    if workers is not None:
        workers(run)
    else:
        run.engine = make_engine(run)
        if run.cfg.env.name:                                 # multi-turn episodes with an environment
            run.engine = make_env_engine(run, run.engine)
        run.engine.update_weights(run.policy, run.step)      # resumed runs: the engine starts from the checkpoint
        run.scorer = lambda batch, state=None: score(run.cfg, run.algo, run.rewards, batch, state, run.iterative)


def make_engine(run: Run) -> RolloutEngine:
    """The engine named by ``rollout.engine`` for a single-process (or torchrun) run."""
    name = run.cfg.rollout.engine
    if name == "builtin":
        return BuiltinEngine(run.policy, run.tokenizer, run.device, unsharded=lambda: D.unsharded(run),
                             weights_dtype=run.cfg.rollout.dtype)
    if name == "vllm":
        return VLLMEngine.from_config(run.cfg, run.model_dir, run.tokenizer)
    raise ConfigError(f"config key 'rollout.engine': unknown engine '{name}' (choose builtin or vllm).")


def collect(run: Run, t: Timer, step: int | None = None) -> tuple[RolloutBatch, dict]:
    """Sample G completions for ``prompts_per_step`` prompts and score them. With dynamic sampling
    (DAPO), groups whose rewards are all equal are dropped and more prompts are sampled, for at most
    ``algo.max_extra_rounds`` extra rounds; the batch is then topped up with dropped groups.
    Asynchronous runs (Ray, ``distributed.max_staleness`` > 0) call this ahead of the learner, in the
    background, for a later ``step``; the loop then takes the finished batch from ``run.prefetch``."""
    if run.prefetch is not None and step is None:
        return run.prefetch.next(t)
    cfg, algo = run.cfg, run.algo
    kept, dropped, rounds, zero_std, n_groups, stats = [], [], 0, 0, 0, []
    need, state = cfg.prompts_per_step, reward_state(run, step)      # the trainer_state reward functions get
    while True:
        with t("rollout"):
            batch = sample(run, run.prompts.take(need if not kept else need - sum(len(b) for b in kept) // cfg.group_size),
                           rounds, step)
        with t("reward"):
            stats.append(run.scorer(batch, state))
        flat = A.zero_std_groups(torch.nan_to_num(batch.rewards, nan=0.0), cfg.group_size)        # [B]
        zero_std += int(flat.sum())
        n_groups += flat.numel()
        if not algo.dynamic_sampling:
            kept.append(batch)
            break
        rows = ~flat.repeat_interleave(cfg.group_size)
        kept.append(batch.select(rows.nonzero().squeeze(-1)))
        dropped.append(batch.select((~rows).nonzero().squeeze(-1)))
        have = sum(len(b) for b in kept) // cfg.group_size
        if have >= need or rounds >= algo.max_extra_rounds:
            break
        rounds += 1
    batch = RolloutBatch.cat([b for b in kept if len(b)] or [kept[0]])
    short = need * cfg.group_size - len(batch)
    if short > 0 and dropped:
        batch = RolloutBatch.cat([batch, RolloutBatch.cat(dropped).select(torch.arange(short))])
    batch = batch.select(torch.arange(min(len(batch), need * cfg.group_size)))
    stats = D.combine_metrics(stats)                     # over the rounds: counts add up, the rest is averaged
    stats["frac_zero_std_groups"] = zero_std / max(1, n_groups)
    if algo.dynamic_sampling:
        stats["dynamic/extra_rounds"] = rounds
        stats["dynamic/frac_groups_dropped"] = zero_std / max(1, n_groups)
    return batch, stats


def sample(run: Run, picked: list, round_: int = 0, step: int | None = None) -> RolloutBatch:
    """G completions for each picked (index, row) from the rollout engine; group j of this step's round
    draws from its own seeded stream, so samples do not depend on batch composition or on the rank
    (or the worker) that draws them."""
    cfg = run.cfg
    step = run.step if step is None else step
    first, picked = D.shard(run, picked)   # this rank's contiguous groups, first's global index (one process: all, 0)
    seeds = [hash((cfg.seed, step, round_, first + j)) & 0x7FFFFFFF for j in range(len(picked))]
    prompts = [render_prompt(r["prompt"], run.tokenizer, i) for i, r in picked]
    return run.engine.generate(prompts, [r for _, r in picked], seeds, sampling_spec(run))


def sampling_spec(run: Run) -> SamplingSpec:
    cfg = run.cfg
    return SamplingSpec(group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                        top_p=cfg.top_p, top_k=cfg.top_k, keep_support=run.algo.keep_sampling_mask,
                        keep_routing=run.algo.keep_routing, max_prompt_len=run.max_prompt_len, dtype=cfg.dtype)


def reward_state(run: Run, step: int | None = None):
    """The ``trainer_state`` reward functions get: steps done before this one, max_steps, and the
    passes over the prompt dataset before this step's prompts."""
    stream = run.prompts
    return TrainerState(global_step=run.step if step is None else step, max_steps=run.cfg.max_steps,
                        epoch=stream.epoch + stream.pos / max(1, len(stream.rows)))


def score(cfg: Config, algo, reward_set: Rewards, batch: RolloutBatch, state=None,
          iterative: Iterative | None = None) -> dict:
    """batch.rewards [N] (NaN where a reward source failed) and batch.valid [N]; process reward
    sources fill batch.step_rewards / step_ends; DAPO's overlong shaping is added to the reward.
    Every source is called as TRL calls it (``lmpo.rewards.combine``); one that gives nothing on
    every sample for ``reward_fail_steps`` consecutive batches stops the run. ``iterative``: iterative
    GRPO's state, which collects verifier-labelled pairs for its reward model."""
    state = state or TrainerState(max_steps=cfg.max_steps)
    prompts, completions, columns = reward_inputs(batch.rows, batch.completions)      # TRL's two forms
    ids = [row[: int(m.sum())].tolist() for row, m in zip(batch.completion_ids, batch.mask)]  # EOS included
    pairs = list(zip(reward_set.sources, reward_set.weights))
    outcome = [(s, w) for s, w in pairs if not is_process_reward(s[1])]
    process = [(s, w) for s, w in pairs if is_process_reward(s[1])]
    device = batch.mask.device
    metrics, dead, details = {}, {}, [{"rewards": {}, "extra": {}} for _ in range(len(batch))]
    call = dict(completion_ids=ids, trainer_state=state, timeout_s=cfg.reward_timeout_s)
    if process:
        mean_step, dead, metrics = process_rewards(batch, process, prompts, completions, columns, call)
        rewards, valid = mean_step, ~torch.isnan(mean_step)
    if outcome:
        res = compute_rewards([s for s, _ in outcome], [w for _, w in outcome], prompts, completions, columns,
                              completion_ids=ids, trainer_state=state,
                              how=CallPolicy(cfg.reward_workers, cfg.reward_errors, cfg.reward_timeout_s))
        if res.failures:
            import warnings

            warnings.warn(f"{len(res.failures)} reward failures this step (those samples get no gradient); "
                          f"first: {res.failures[0]}", stacklevel=2)
        rewards = torch.tensor(res.rewards, dtype=torch.float32, device=device)            # [N]
        valid = torch.tensor(res.valid, dtype=torch.bool, device=device) & (valid if process else True)
        metrics = {**metrics, **res.logged, **res.metrics}      # log_metric's names; the built-in ones win
        dead.update(res.dead())
        for i, d in enumerate(details):                         # per-source rewards and log_extra, for samples.jsonl
            d["rewards"] = {name: _finite(values[i]) for name, values in res.per_func.items()}
            d["extra"] = {col: values[i] for col, values in res.extra.items()}
        if iterative is not None:       # verifier-labelled pairs from this policy, for the next RM update
            iterative.add_pairs(batch.prompts, batch.completions, res.per_func,
                                {name: w for (name, _), w in outcome}, cfg.group_size)
    watch_total_failure(reward_set.fail_streaks, [name for (name, _), _ in pairs], dead,
                        cfg.reward_fail_steps, state.global_step + 1, cfg.reward_timeout_s)
    batch.reward_details = details
    lengths = batch.mask.sum(-1)
    if algo.overlong_buffer:
        rewards = rewards + A.overlong_penalty(lengths, cfg.max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
    valid = valid & torch.isfinite(rewards)      # float32: 1e39 is inf there; NaN or inf = an invalid sample
    batch.rewards, batch.valid = rewards, valid
    r = rewards[valid].double()                  # float64: sums of rewards near 3e38 do not overflow
    return {**metrics,
            "reward/mean": float(r.mean()) if r.numel() else float("nan"),
            "reward/std": float(r.std()) if r.numel() > 1 else 0.0,
            "reward/invalid": int((~valid).sum()),
            "completion/mean_length": float(lengths.mean()),
            "completion/truncated_frac": float(batch.truncated.float().mean())}


def process_rewards(batch: RolloutBatch, process: list, prompts: list, completions: list, columns: dict,
                    call: dict) -> tuple[torch.Tensor, dict, dict]:
    """Call the (single) process reward source; fill batch.step_rewards [N, S] (NaN-padded) and
    batch.step_ends [N, S] (-1-padded). Returns each sample's mean step reward (NaN if none),
    {name: first error} when the source failed or gave None on every sample, and its log_metric values."""
    if len(process) > 1:
        raise RewardError(f"only one process reward source may be used, got {[s[0] for s, _ in process]}.")
    (name, fn), weight = process[0]
    logs = RewardLogs(len(batch))
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": call["completion_ids"], **columns,
              "trainer_state": call["trainer_state"] or TrainerState(), "log_metric": logs.log_metric,
              "log_extra": logs.log_extra}
    check_arguments(name, fn, kwargs)
    (out, exc, _), = call_all([(name, fn)], kwargs, call["timeout_s"])
    if exc is not None:
        import warnings

        warnings.warn(f"process reward '{name}' raised on the batch (those samples get no gradient): {describe(exc)}",
                      stacklevel=2)
        out = [None] * len(batch)
    if not isinstance(out, list) or len(out) != len(batch):
        raise RewardError(f"process reward '{name}' returned {type(out).__name__} of length "
                          f"{len(out) if hasattr(out, '__len__') else '?'}; expected a list of {len(batch)}.")
    S = max([len(o["rewards"]) for o in out if o] or [1])
    sr = torch.full((len(batch), S), float("nan"))
    se = torch.full((len(batch), S), -1, dtype=torch.long)
    for i, o in enumerate(out):
        if o:
            if len(o["rewards"]) != len(o["ends"]):
                raise RewardError(f"process reward '{name}' sample {i}: {len(o['rewards'])} rewards but "
                                  f"{len(o['ends'])} step ends.")
            k = len(o["rewards"])
            sr[i, :k] = torch.tensor(o["rewards"], dtype=torch.float32) * weight
            se[i, :k] = torch.tensor(o["ends"], dtype=torch.long)
    batch.step_rewards, batch.step_ends = sr.to(batch.mask.device), se.to(batch.mask.device)
    dead = {} if any(out) else {name: describe(exc) if exc is not None else "returned None for every sample"}
    return torch.nanmean(sr, dim=1).to(batch.mask.device), dead, logs.metrics()


def _finite(v):
    return None if v is None or not math.isfinite(v) else v


# ----------------------------------------------------------------------------- prepare


@torch.no_grad()
def prepare(run: Run, batch: RolloutBatch, t: Timer | None = None) -> dict:
    """Fill old/ref log-probs, values, per-token rewards, advantages and masks. ``t`` times the
    forwards inside (``time/prepare/old_logp_s``, ``ref_s``, ``values_s``: parts of ``time/logprob_s``)."""
    cfg, algo = run.cfg, run.algo
    t = t or Timer()
    batch.mask = batch.mask * batch.valid[:, None]                           # invalid samples: no gradient
    rewards = torch.where(batch.valid, batch.rewards, torch.full_like(batch.rewards, float("nan")))  # NaN: in no statistic
    with t("prepare/old_logp"):
        if old_logp_mode(run) == "recompute":
            batch.old_logp = logp_of(run, run.policy, batch)
        elif old_logp_mode(run) == "sampler":
            batch.old_logp = batch.sampler_logp
    with t("prepare/ref"):
        if run.use_ref:
            batch.ref_logp = ref_logp_of(run, batch)
    with t("prepare/values"):
        if run.critic is not None:                         # V(s_t) [N, T] before the update
            run.critic.fill_values(run.policy, batch, cfg.temperature, keep_graph=one_update_pass(run, batch))
    stats = {}
    if batch.turn_rewards is not None and algo.advantage in ("gae", "reinforce_pp"):   # turn rewards where earned
        w = sum(wt for (name, _), wt in zip(run.rewards.sources, run.rewards.weights) if name == "env_reward")
        batch.token_rewards = A.turn_token_rewards(rewards, batch.turn_rewards, w, batch.mask)   # [N, T]
    if algo.kl_placement == "reward" and batch.ref_logp is not None:
        behaviour = batch.old_logp if batch.old_logp is not None else batch.sampler_logp
        scores = rewards if batch.token_rewards is None else batch.token_rewards
        batch.token_rewards = A.kl_in_reward(scores, behaviour, batch.ref_logp, batch.mask, run.beta,
                                             algo.kl_estimator)                                    # [N, T]
        stats["kl_reward"] = float(((behaviour - batch.ref_logp) * batch.mask).sum() / batch.mask.sum().clamp(min=1))
    batch.adv, batch.returns = D.global_rows(                                 # batch statistics over all ranks
        run, lambda **rows: advantages(run, **rows), rewards=rewards, mask=batch.mask,
        token_rewards=batch.token_rewards, values=batch.values, step_rewards=batch.step_rewards,
        step_ends=batch.step_ends)                                             # [N, T]
    stats["adv/mean"] = float((batch.adv * batch.mask).sum() / batch.mask.sum().clamp(min=1))
    if batch.values is not None:
        stats["critic/value_mean"] = float((batch.values * batch.mask).sum() / batch.mask.sum().clamp(min=1))
    return stats


def advantages(run: Run, *, mask, **rows) -> tuple:
    """The estimator, then whitening over the batch's real tokens when the algorithm asks for it."""
    algo = run.algo
    adv, returns = A.ADVANTAGES[algo.advantage](A.AdvantageInputs(mask=mask, group_size=run.cfg.group_size,
                                                                  gamma=algo.gamma, lam=algo.lam, eps=algo.adv_eps,
                                                                  **rows))                    # [N, T]
    return (A.whiten(adv, mask) * mask if algo.whiten_advantages else adv), returns


def old_logp_mode(run: Run) -> str:
    """π_old: 'recompute' (an extra forward), 'sampler' (the rollout's log-probs), or 'current'
    (one optimizer step per rollout: π_old is the current policy, detached; no extra forward)."""
    mode = run.cfg.old_logp
    if mode != "auto":
        return mode
    cfg = run.cfg
    single = cfg.epochs == 1 and cfg.minibatches == 1
    needs_before_update = run.algo.kl_placement == "reward" and run.use_ref
    # KL in the reward needs log π_old before the update; the built-in sampler recorded exactly that
    # (same weights, full distribution, float32), so that forward's result is known: no recompute
    sampler_is_old = (cfg.rollout.engine == "builtin" and cfg.distributed.backend == "torch" and cfg.top_p == 1
                      and cfg.top_k == 0 and cfg.dtype == "float32" and cfg.rollout.dtype == "float32")
    return "current" if single and (not needs_before_update or sampler_is_old) else "recompute"


def one_update_pass(run: Run, batch: RolloutBatch) -> bool:
    """One optimizer step per rollout on one micro-batch: a separate critic's values before the update
    are the values the loss needs, so its forward runs once (kept with its graph) instead of twice."""
    cfg = run.cfg
    return (cfg.epochs == 1 and cfg.minibatches == 1 and run.world.size == 1
            and (cfg.micro_batch_size is None or cfg.micro_batch_size >= len(batch)))


def logp_of(run: Run, model, batch: RolloutBatch) -> torch.Tensor:
    chunks = []
    for idx in micro_batches(run, torch.arange(len(batch))):
        mb = batch.select(idx)
        with autocast(run):
            logp, _, _ = completion_logp(model, mb, run.cfg.temperature, run.algo.keep_sampling_mask,
                                         padding_free=run.cfg.padding_free)
        chunks.append(logp.float())
    return torch.cat(chunks)


def ref_logp_of(run: Run, batch: RolloutBatch) -> torch.Tensor:
    if run.ref is not None:
        return logp_of(run, run.ref, batch)
    with run.policy.disable_adapter():  # LoRA: the reference is the base model
        return logp_of(run, run.policy, batch)


def autocast(run: Run):
    return torch.autocast(run.device.type, dtype=torch.bfloat16) if run.cfg.dtype == "bfloat16" else nullcontext()


def micro_batches(run: Run, idx: torch.Tensor):
    size = run.cfg.micro_batch_size or len(idx)
    return list(idx.split(size))


# ----------------------------------------------------------------------------- update


def update(run: Run, batch: RolloutBatch, t: Timer) -> dict:
    """μ epochs over the batch, each split into ``minibatches`` optimizer steps. Groups are shuffled
    whole, so a group's rows stay together and its prompt is computed once in the forward."""
    cfg = run.cfg
    sums: dict = {"train/skipped_steps": 0}
    n_updates = 0
    G = cfg.group_size if len(batch) % cfg.group_size == 0 else 1
    for _ in range(cfg.epochs):
        perm = (torch.randperm(len(batch) // G)[:, None] * G + torch.arange(G)).reshape(-1)
        for mb_idx in perm.chunk(cfg.minibatches):
            mb = batch.select(mb_idx)
            totals = D.all_sum(run, {"global_tokens": mb.mask.sum(), "global_seqs": (mb.mask.sum(-1) > 0).sum()})
            totals = {k: v.clamp(min=1) for k, v in totals.items()}     # over all ranks' minibatches
            for opt in run.optimizers:                                   # the policy's, a separate critic's
                opt.zero_grad(set_to_none=True)
            loss_finite = True
            with t("update"):
                for idx in micro_batches(run, torch.arange(len(mb))):
                    loss, stats = loss_fn(run, mb.select(idx), totals)
                    loss.backward()
                    loss_finite &= math.isfinite(stats["loss"])
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v * len(idx) / len(mb)
            with t("optimizer"):
                D.sync_grads(run)           # sum over ranks: each rank's loss is its share of the global loss
                bad = torch.tensor(float(not loss_finite), device=run.device)
                loss_finite = float(D.all_sum(run, {"bad": bad})["bad"]) == 0     # every rank decides alike
                norm, stepped = clip_and_step(run, loss_finite)
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + norm
            n_updates += 1
            count_skip(run, stepped)
            sums["train/skipped_steps"] += not stepped
    out = {k: v / n_updates if k != "train/skipped_steps" else v for k, v in sums.items()}
    out["lr"] = run.scheduler.get_last_lr()[0]
    out["beta"] = run.beta
    return out


def loss_fn(run: Run, mb: RolloutBatch, totals: dict) -> tuple[torch.Tensor, dict]:
    """The loss of one micro-batch: the policy's objective, + vf_coef · value loss with a critic (which
    orders its work around the policy's forward: ``Critic.add_value_loss``), + ptx. Normalized by the
    minibatch's token / sequence counts so accumulated micro-batches give the minibatch loss."""
    if run.critic is not None:
        loss, stats = run.critic.add_value_loss(mb, totals, lambda head: policy_objective(run, mb, totals, head))
    else:
        loss, stats, _ = policy_objective(run, mb, totals)
    if run.cfg.ppo.ptx_coef > 0:
        ptx = ptx_loss(run, len(mb) / float(totals["global_seqs"]))
        loss = loss + run.cfg.ppo.ptx_coef * ptx
        stats["ptx/loss"] = ptx.item()
    return loss, stats


def policy_objective(run: Run, mb: RolloutBatch, totals: dict, value_head=None) -> tuple[torch.Tensor, dict, object]:
    """The policy's loss (+ KL in the loss) of one micro-batch, its stats, and the values ``value_head``
    gives on the forward's last hidden states (a shared critic's; None without a head)."""
    cfg, algo = run.cfg, run.algo
    with autocast(run):
        logp, entropy, values = completion_logp(run.policy, mb, cfg.temperature, algo.keep_sampling_mask,
                                                with_entropy=True, value_head=value_head,
                                                padding_free=cfg.padding_free)                   # [n, T]
    old = mb.old_logp if mb.old_logp is not None else logp.detach()
    mask = mb.mask
    real = mask > 0
    stats = {}
    per_tok = A.policy_loss(logp, old, mb.adv, mask, algo.eps_low, algo.eps_high, level=algo.ratio_level,
                            dual_clip=algo.dual_clip)                                             # [n, T]
    if algo.tis_cap is not None:            # the sampler is not π_old (another engine, stale weights): reweight
        is_w = A.truncated_is_weights(old, mb.sampler_logp, mask, algo.tis_cap)                   # [n, T]
        per_tok = per_tok * is_w
        stats["tis/weight_mean"] = float(is_w[real].mean()) if real.any() else 1.0
    if algo.off_policy_delta is not None:   # V3.2: M multiplies the clipped policy term only, the KL below stays
        adv = mb.adv if algo.ratio_level == "token" else (mb.adv * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # GSPO: A_i
        keep = A.off_policy_sequence_mask(logp.detach(), mb.sampler_logp, adv, mask, algo.off_policy_delta)  # [n, T]
        stats["off_policy/masked_frac"] = float(1 - keep[real].mean()) if real.any() else 0.0
        per_tok = per_tok * keep
    kl = None
    if mb.ref_logp is not None:
        kl = A.unbiased_kl(logp, old, mb.ref_logp, algo.kl_estimator, mask=mask) if algo.unbiased_kl else \
            A.kl_penalty(logp, mb.ref_logp, algo.kl_estimator, mask=mask)                         # [n, T]
        if algo.kl_placement == "loss":
            per_tok = per_tok + run.beta * kl
    agg = dict(mode=algo.loss_agg, max_len=algo.max_len, **totals)
    loss = A.aggregate_loss(per_tok, mask, **agg)
    with torch.no_grad():
        if mb.old_logp is None or not real.any():  # π_old is the current policy: ρ = 1 exactly, nothing clipped
            ratio_stats = {"actor/clip_frac": 0.0, "actor/ratio_mean": 1.0, "actor/ratio_max": 1.0, "actor/ratio_min": 1.0}
        else:
            ratio = torch.exp(logp - old)[real]
            ratio_stats = {
                "actor/clip_frac": float(A.clip_fraction(logp, old, mb.adv, mask, algo.eps_low, algo.eps_high, algo.ratio_level)),
                "actor/ratio_mean": float(ratio.mean()), "actor/ratio_max": float(ratio.max()),
                "actor/ratio_min": float(ratio.min())}
        stats.update({
            "loss": loss.item(), **ratio_stats,
            "entropy": float(entropy[real].mean()) if real.any() else 0.0,
            "kl": float(A.kl_penalty(logp, mb.ref_logp, "k3", mask=mask)[real].mean()) if kl is not None and real.any() else 0.0,
        })
    return loss, stats, values


def ptx_loss(run: Run, share: float) -> torch.Tensor:
    """PPO-ptx (InstructGPT): a language-modelling loss on SFT / pretraining pairs."""
    rows = run.ptx_rows
    g = torch.Generator().manual_seed(run.cfg.seed + run.step)
    pick = torch.randint(len(rows), (run.cfg.prompts_per_step,), generator=g).tolist()
    ids, attn, lab = encode_pairs(run.tokenizer, [render_prompt(rows[i]["prompt"], run.tokenizer, i) for i in pick],
                                  [str(rows[i]["completion"]) for i in pick])
    with autocast(run):
        return completion_nll(run.policy, ids.to(run.device), attn.to(run.device), lab.to(run.device)) * share


def clip_and_step(run: Run, loss_finite: bool = True) -> tuple[float, bool]:
    """Clip the gradients and take the optimizer step; returns (policy grad norm, stepped). A
    non-finite loss or gradient norm (policy or critic) skips the step: the gradients are dropped,
    the weights, the optimizer state and the learning-rate schedule stay as they were. The norms
    are of the gradients summed over ranks, so every rank takes the same decision."""
    norms = [float(torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                                  run.cfg.max_grad_norm or float("inf")))
             for opt in run.optimizers]                   # the policy's (with a shared value head), a critic's
    if not (loss_finite and all(math.isfinite(n) for n in norms)):
        for opt in run.optimizers:
            opt.zero_grad(set_to_none=True)
        return norms[0], False
    if run.step >= run.cfg.ppo.critic_warmup_steps:     # PPO critic warm-up: the policy waits
        run.optimizer.step()
        run.scheduler.step()
    for opt in run.optimizers[1:]:
        opt.step()
    for opt in run.optimizers:        # the gradients' memory is free for the next rollout (SmolLM2: 538 MB)
        opt.zero_grad(set_to_none=True)
    return norms[0], True


def count_skip(run: Run, stepped: bool):
    """``max_skipped_steps`` skipped optimizer steps in a row stop the run (DivergedError, exit 2);
    the weights are those of the last good step, which the crash checkpoint keeps."""
    run.skipped_in_a_row = 0 if stepped else run.skipped_in_a_row + 1
    if run.skipped_in_a_row >= run.cfg.max_skipped_steps:
        run.skipped_in_a_row = 0
        raise DivergedError(f"training diverged at step {run.step + 1}: {run.cfg.max_skipped_steps} optimizer steps in "
                            "a row had a non-finite loss or gradient and were skipped (config key "
                            "'max_skipped_steps'). Lower 'learning_rate', set 'max_grad_norm', or check the rewards; "
                            f"the checkpoint in {run.cfg.output_dir}/checkpoints holds the weights before the divergence.")


def weights_finite(run: Run, collective: bool = True) -> bool:
    """Every weight of the policy (and critic, value head) is finite. ``collective``: agreed over
    ranks (each rank checks its shard); False checks only this rank's tensors (a crash path)."""
    bad = torch.zeros((), dtype=torch.float64, device=run.device)
    for model in run.trained_modules():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += (~torch.isfinite(local)).sum().double().to(bad.device)
    if collective:
        bad = D.all_sum(run, {"bad": bad})["bad"]
    return float(bad) == 0


def check_finite_weights(run: Run):
    """The guard before every save: final/ and checkpoints are never written with NaN or inf weights."""
    if not weights_finite(run):
        raise DivergedError(f"training diverged: the weights hold NaN or inf at step {run.step}; nothing was saved "
                            f"over the last good checkpoint in {run.cfg.output_dir}. Lower 'learning_rate' or set "
                            "'max_grad_norm'.")


# ----------------------------------------------------------------------------- around the step


def step_times(t: Timer, total: float) -> dict:
    out = {f"time/{k}_s": v for k, v in t.items()}
    out["time/other_s"] = max(0.0, total - sum(v for k, v in t.items() if "/" not in k))   # "a/b": a part of a
    out["time/step_s"] = total
    return out


def adapt_kl(run: Run, metrics: dict):
    """Ziegler et al.'s adaptive KL controller: β moves towards the target KL (``ppo.kl_target``)."""
    cfg = run.cfg
    if cfg.ppo.kl_target is not None and "kl" in metrics:
        observed = metrics.get("kl_reward", metrics["kl"])
        run.beta = A.adaptive_kl_coef(run.beta, observed, cfg.ppo.kl_target, cfg.ppo.kl_horizon,
                                      cfg.prompts_per_step * cfg.group_size)


def iterative_reset(run: Run, metrics: dict):
    """Iterative GRPO (DeepSeekMath Alg. 1): every K steps the reference becomes the current policy
    and, with ``iterative.rm_retrain``, the reward model continues training on verifier-labelled
    pairs of recent policy samples with a replay of historical pairs."""
    run.iterative.after_step(run.step, run.policy, run.ref, dict(run.rewards.sources).get("reward_model"),
                             run.cfg.output_dir, run.cfg.seed, metrics)


def samples(batch: RolloutBatch, k: int) -> list[dict]:
    """The first k samples: prompt, completion, combined reward, each source's reward and the
    reward functions' log_extra values."""
    return [{"prompt": batch.prompts[i], "completion": batch.completions[i],
             "reward": None if math.isnan(float(batch.rewards[i])) else float(batch.rewards[i]),
             **(batch.reward_details[i] if batch.reward_details else {})}
            for i in range(min(k, len(batch)))]


def save_final(run: Run):
    out = Path(run.cfg.output_dir) / "final"
    model = run.policy.merge_and_unload() if run.cfg.lora_r else run.policy
    model = D.saveable(run, model)                                  # fsdp: full weights gathered on rank 0
    if run.world.main:
        model.save_pretrained(out)
        run.tokenizer.save_pretrained(out)


def peak_rss_mib() -> float:
    """This process's peak resident set size. /proc's VmHWM belongs to the process image, whereas
    getrusage's ru_maxrss also counts the parent's memory before a fork + exec (so a run started by
    ``lmpo compare`` would report the parent's peak)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_summary(run: Run, metrics: dict, wall_s: float):
    """summary.json: final metrics, wall time, peak RSS and the bytes each trained model holds."""
    state = run.state_bytes()
    summary = {**metrics, "wall_s": wall_s, "steps": run.step,
               "samples_per_step": run.cfg.prompts_per_step * run.cfg.group_size,
               "peak_rss_mib": peak_rss_mib(),
               "model_state_mib": {k: v["total"] / 2**20 for k, v in state.items()},
               "model_state_bytes": state}
    (Path(run.cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))


def evaluate_policy(run: Run) -> dict:
    sources, weights = eval_sources(run.cfg, run.rewards.sources, run.rewards.weights)
    if not sources:
        return {}
    with D.unsharded(run):                                          # every rank evaluates the same rows
        acc = held_out_accuracy(run.policy, run.tokenizer, run.eval_rows, sources, weights, run.cfg,
                                trainer_state=reward_state(run))
    return {f"eval/{k}": v for k, v in acc.items()}
