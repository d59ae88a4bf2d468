"""Ray backend (``distributed.backend: ray``): rollout workers, reward workers and the learner as
Ray actors, in one placement group with an explicit bundle per actor:

    bundle 0            learner           the loop of ``rl.py`` (prepare, update, log, checkpoint)
    bundles 1 … R       rollout workers   each a copy of the policy and the built-in engine
    bundles R+1 … R+W   reward workers    the reward sources (functions, reward model, URL)

The loop is unchanged: the learner's ``run.rollout.engine`` is a ``RolloutPool`` (the engine interface of
``lmpo.rollout.engine``, spread over the rollout workers) and its ``run.rollout.scorer`` a ``RewardPool``.

* Synchronous (``max_staleness: 0``): each step the learner's weights go to every rollout worker
  (one ``ray.put``), the step's groups are split over the workers, then scored by the reward
  workers; the learner waits for both. The result equals the single-process run's sampling
  (per-group seeds), up to the weights' float round trip (none: they are copied exactly).
* Asynchronous (``max_staleness: K`` ≥ 1): a thread in the learner collects the batches of the
  next steps while the learner trains, each from weights at most K updates old (it waits for the
  learner otherwise). Each row carries the version that sampled it (``policy_version``); the loss
  corrects for the lag with the sampler's log-probs: truncated importance weights
  min(π_old/π_sampler, C) (``algo.tis_cap``, 2 by default here) and, when set, off-policy sequence
  masking (``algo.off_policy_delta``).

A worker that dies (killed, out of memory) is restarted by Ray up to ``distributed.worker_restarts``
times; its part of the step is resubmitted with the current weights. Past that, or when nothing
comes back within ``distributed.ray_timeout_s``, the run stops with ``WorkerError`` naming the
worker, and the loop's crash handler leaves a resumable checkpoint. Nothing waits forever.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from lmpo.errors import WorkerError  # noqa: F401 (its home is lmpo.errors; imported from here too)
from lmpo.config import ConfigError, validate
from lmpo.io.stop import Interrupted
from lmpo.models.load import hf_weights, load_causal_lm
from lmpo.parallel.torchrun import combine_metrics
from lmpo.rl.loop import Timer, collect, score, train
from lmpo.rl.setup import Rewards, reward_sources
from lmpo.rollout import RolloutBatch
from lmpo.rollout.engine import BuiltinEngine


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("config key 'distributed.backend' is 'ray' but Ray is not installed: pip install 'lmpo[ray]'.") from None
    return ray


# ----------------------------------------------------------------------------- driver


def launch(cfg, resume: bool = False) -> dict:
    """``lmpo train`` with ``distributed.backend: ray``: join (or start) a Ray cluster, reserve the
    placement group, run the loop in the learner actor and return its final metrics."""
    validate(cfg)                                  # before a cluster is joined or started
    ray = _ray()
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    d = cfg.distributed
    n_actors = 1 + d.rollout_workers + d.reward_workers
    started = not ray.is_initialized()
    if started:
        # a local cluster's workers run at the user's priority, not Ray's default nice 15: they are the
        # run (the learner trains in one), and at nice 15 any other work on the machine starves them
        local = {} if d.ray_address else {"num_cpus": d.ray_num_cpus or n_actors, "_system_config": {"worker_niceness": 0}}
        ray.init(address=d.ray_address, include_dashboard=False, logging_level="WARNING", **local)
    learner_gpu = 1 if cfg.device in ("cuda", "auto") and torch.cuda.is_available() else 0
    rollout_gpu = {"GPU": d.ray_rollout_gpus} if d.ray_rollout_gpus else {}
    bundles = ([{"CPU": 1, **({"GPU": learner_gpu} if learner_gpu else {})}]
               + [{"CPU": 1, **rollout_gpu}] * d.rollout_workers + [{"CPU": 1}] * d.reward_workers)
    pg = placement_group(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=d.ray_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise WorkerError(f"Ray could not place {n_actors} actors ({bundles}) within distributed.ray_timeout_s="
                          f"{d.ray_timeout_s} s; the cluster has {ray.cluster_resources()}.") from None
    learner = ray.remote(_Learner).options(
        num_cpus=1, num_gpus=learner_gpu, max_restarts=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)).remote()
    try:
        with _forward_signals(*ray.get(learner.where.remote(), timeout=d.ray_timeout_s)) as got:
            out = ray.get(learner.train.remote(cfg, resume, pg))
        if isinstance(out, dict) and "_interrupted" in out:          # stopped on a forwarded signal
    
            step, ckpt, at_once = out["_interrupted"]
            raise Interrupted(got[0] if got else signal.SIGTERM, step, ckpt, at_once)
        return out
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise WorkerError(f"the Ray learner failed: {e}") from None
    except ray.exceptions.RayActorError as e:
        raise WorkerError(f"the Ray learner actor died: {e}. Rerun with --resume to continue from the last "
                          f"checkpoint in {cfg.output_dir}.") from None
    finally:
        try:
            ray.kill(learner)
            remove_placement_group(pg)
        finally:
            if started:
                ray.shutdown()


@contextmanager
def _forward_signals(pid: int, host: str):
    """SIGINT / SIGTERM to the driver reach the learner (on this host) as SIGTERM, which stops it after
    the step with a checkpoint; yields the list of signals the driver got (the first sets the exit status)."""
    got: list = []
    if host != socket.gethostname() or threading.current_thread() is not threading.main_thread():
        yield got
        return

    def forward(signum, frame):
        got.append(signum)
        os.kill(pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class _Learner:
    """The loop, in an actor: ``rl.loop.train`` with ``workers`` that attach the worker pools (in the
    placement group's later bundles) instead of an engine and a scorer in this process."""

    def where(self) -> tuple[int, str]:
        return os.getpid(), socket.gethostname()

    def train(self, cfg, resume, pg):
        cfg = replace(cfg, threads=cfg.threads or 1)          # the actor has one CPU of the placement group
        try:
            return train(cfg, resume=resume, workers=lambda run: attach_workers(run, pg))
        except Interrupted as e:        # Ray reports a KeyboardInterrupt as a cancelled task: hand it back
            return {"_interrupted": (e.step, str(e.checkpoint) if e.checkpoint else None, e.at_once)}


# ----------------------------------------------------------------------------- workers (actors)


class RolloutWorker:
    """A copy of the policy and the built-in engine; weights arrive from the learner."""

    def __init__(self, model_dir: str, tokenizer, threads: int, gpu: bool = False):

        torch.set_num_threads(threads)
        device = torch.device("cuda" if gpu else "cpu")
        self.engine = BuiltinEngine(load_causal_lm(model_dir, device, trainable=False), tokenizer, device)

    def pid(self) -> int:
        return os.getpid()

    def set_weights(self, state: dict, version: int) -> int:
        self.engine.update_weights(state, version)
        return version

    def generate(self, prompts, rows, seeds, spec, version: int):
        """The batch, or None when this worker does not hold weights ``version`` (it was restarted)."""
        if self.engine.version != version:
            return None
        return self.engine.generate(prompts, rows, seeds, spec).to("cpu")


class RewardWorker:
    """The run's reward sources; scores batches exactly as ``rl.score`` does in one process."""

    def __init__(self, cfg, algo):
        self.cfg, self.algo, self.rewards = cfg, algo, Rewards(*reward_sources(cfg))

    def pid(self) -> int:
        return os.getpid()

    def score(self, batch, state=None):

        stats = score(self.cfg, self.algo, self.rewards, batch, state)
        return {"rewards": batch.rewards, "valid": batch.valid, "step_rewards": batch.step_rewards,
                "step_ends": batch.step_ends, "reward_details": batch.reward_details, "stats": stats}


class _Workers:
    """Actors of one kind with restart-and-resubmit: ``call(i, method, *args)`` runs on worker i
    and, if the worker died, waits for Ray to restart it, runs ``on_restart(i)`` and tries again."""

    def __init__(self, kind: str, cls, n: int, first_bundle: int, cfg, args, on_restart=None, gpus: float = 0.0,
                 pg=None):
        ray = _ray()
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.ray, self.kind, self.cfg, self.on_restart = ray, kind, cfg, on_restart
        self.restarts = [0] * n
        self.actors = []
        for i in range(n):
            opts = dict(num_cpus=1, num_gpus=gpus, max_restarts=cfg.distributed.worker_restarts, max_task_retries=0)
            if pg is not None:
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=first_bundle + i)
            self.actors.append(ray.remote(cls).options(**opts).remote(*args))
        self.pids = self.get([a.pid.remote() for a in self.actors], what="start")

    def get(self, refs, what: str, worker: int | None = None):
        try:
            return self.ray.get(refs, timeout=self.cfg.distributed.ray_timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            who = f"{self.kind} worker {worker}" if worker is not None else f"{self.kind} workers"
            raise WorkerError(f"{who} did not answer '{what}' within distributed.ray_timeout_s="
                              f"{self.cfg.distributed.ray_timeout_s} s.") from None

    def call(self, i: int, method: str, *args):
        while True:
            try:
                return self.get(getattr(self.actors[i], method).remote(*args), what=method, worker=i)
            except self.ray.exceptions.RayActorError as e:
                self.restarts[i] += 1
                if self.restarts[i] > self.cfg.distributed.worker_restarts:
                    raise WorkerError(
                        f"Ray {self.kind} worker {i} (pid {self.pids[i]}) died during '{method}' and its restarts "
                        f"(distributed.worker_restarts={self.cfg.distributed.worker_restarts}) are used up: "
                        f"{type(e).__name__}. The run stops; a resumable checkpoint is written to "
                        f"{self.cfg.output_dir}/checkpoint (rerun with --resume).") from None
                self._wait_alive(i)
                if self.on_restart is not None:
                    self.on_restart(i)

    def _wait_alive(self, i: int):
        """Until worker i's restarted actor answers (Ray restarts it in the background)."""
        deadline = time.monotonic() + self.cfg.distributed.ray_timeout_s
        while time.monotonic() < deadline:
            try:
                self.pids[i] = self.ray.get(self.actors[i].pid.remote(), timeout=self.cfg.distributed.ray_timeout_s)
                return
            except self.ray.exceptions.RayActorError:
                time.sleep(0.2)
        raise WorkerError(f"Ray {self.kind} worker {i} did not come back within distributed.ray_timeout_s.")

    @staticmethod
    def map(jobs: list) -> list:
        """Run the zero-argument callables concurrently (one thread each: each waits on Ray)."""
        if len(jobs) == 1:
            return [jobs[0]()]
        out = [None] * len(jobs)
        errors = []

        def run(k, job):
            try:
                out[k] = job()
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=run, args=(k, job), daemon=True) for k, job in enumerate(jobs)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        return out

    def close(self):
        for a in self.actors:
            self.ray.kill(a, no_restart=True)


# ----------------------------------------------------------------------------- pools seen by the loop


class RolloutPool:
    """The engine interface over R rollout workers: a step's groups are split into R contiguous parts."""

    name = "ray"

    def __init__(self, run, pg=None):
        ray = _ray()
        cfg = run.cfg
        self.ray, self.cfg, self.weights, self.version, self.lock = ray, cfg, None, -1, threading.Condition()
        self.device = run.device
        self.workers = _Workers("rollout", RolloutWorker, cfg.distributed.rollout_workers, 1, cfg,
                                (run.actor.model_dir, run.actor.tokenizer, 1, cfg.distributed.ray_rollout_gpus > 0),
                                on_restart=self._forget, gpus=cfg.distributed.ray_rollout_gpus, pg=pg)
        self.sent = [-1] * len(self.workers.actors)              # weights version each worker holds
        self.update_weights(run.actor.model, run.counters.step)

    def update_weights(self, model, version: int):
        """Snapshot the learner's weights into the object store (in the learner's thread, so a
        background collection never reads half-updated parameters)."""

        ref = self.ray.put({k: v.cpu().clone() for k, v in hf_weights(model).items()})
        with self.lock:
            self.weights, self.version = ref, version
            self.lock.notify_all()

    def wait_version(self, at_least: int, stop: threading.Event):
        with self.lock:
            while self.version < at_least and not stop.is_set():
                self.lock.wait(0.1)

    def _forget(self, i: int):
        self.sent[i] = -1                                         # a restarted worker has its initial weights

    def generate(self, prompts, rows, seeds, spec):

        with self.lock:
            ref, version = self.weights, self.version
        n = len(self.workers.actors)
        parts = [p.tolist() for p in torch.arange(len(prompts)).tensor_split(n) if len(p)]

        def part(i, p):
            args = ([prompts[j] for j in p], [rows[j] for j in p], [seeds[j] for j in p], spec, version)
            for _ in range(self.cfg.distributed.worker_restarts + 2):
                if self.sent[i] != version:
                    self.workers.call(i, "set_weights", ref, version)
                    self.sent[i] = version
                out = self.workers.call(i, "generate", *args)
                if out is not None:
                    return out
                self._forget(i)                                   # restarted between set_weights and generate
            raise WorkerError(f"Ray rollout worker {i} keeps losing its weights (restarted repeatedly).")

        return RolloutBatch.cat(self.workers.map([lambda i=i, p=p: part(i, p) for i, p in enumerate(parts)])).to(self.device)

    def close(self):
        self.workers.close()


class RewardPool:
    """``run.rollout.scorer`` over W reward workers: a batch's groups are split into W parts."""

    def __init__(self, run, pg=None):
        self.run = run
        self.workers = _Workers("reward", RewardWorker, run.cfg.distributed.reward_workers,
                                1 + run.cfg.distributed.rollout_workers, run.cfg, (run.cfg, run.algo), pg=pg)

    def __call__(self, batch, state=None) -> dict:
        rows_by_group = torch.arange(len(batch)).view(-1, batch.group_size)               # [groups, G]
        parts = [p.reshape(-1) for p in rows_by_group.tensor_split(len(self.workers.actors)) if len(p)]
        outs = self.workers.map([lambda i=i, rows=rows: self.workers.call(i, "score", batch.select(rows).to("cpu"), state)
                                 for i, rows in enumerate(parts)])
        restarts = {"ray/worker_restarts": sum(self.workers.restarts) + sum(self.run.rollout.engine.workers.restarts)}
        dev = batch.mask.device
        outs = [{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in o.items()} for o in outs]
        parts_b = []
        for rows, out in zip(parts, outs):
            part = batch.select(rows)
            part.rewards, part.valid, part.step_rewards, part.step_ends, part.reward_details = (
                out["rewards"], out["valid"], out["step_rewards"], out["step_ends"], out["reward_details"])
            parts_b.append(part)

        merged = RolloutBatch.cat(parts_b)
        for f in ("rewards", "valid", "step_rewards", "step_ends", "reward_details"):
            setattr(batch, f, getattr(merged, f))
        return {**_merge_stats([o["stats"] for o in outs], [len(p) for p in parts], batch), **restarts}

    def close(self):
        self.workers.close()


def _merge_stats(stats: list[dict], sizes: list[int], batch) -> dict:
    """One step's reward statistics from W parts: counts add up, means are size-weighted, and the
    reward's mean / std are recomputed over the whole batch."""
    out = combine_metrics(stats, sizes)
    r = batch.rewards[batch.valid]
    out["reward/mean"] = float(r.mean()) if r.numel() else float("nan")
    out["reward/std"] = float(r.std()) if r.numel() > 1 else 0.0
    return out


class Prefetch:
    """Asynchronous collection: a thread runs ``rl.collect`` for the steps ahead of the learner, the
    batch of step s from weights of version ≥ s − K; ``next`` hands the loop the next finished one."""

    def __init__(self, run, max_staleness: int):

        self.run, self.K = run, max_staleness
        self.ready: queue.Queue = queue.Queue()
        self.stop = threading.Event()

        def work(step: int):
            while not self.stop.is_set() and step < run.cfg.max_steps:
                run.rollout.engine.wait_version(step - self.K, self.stop)
                if self.stop.is_set():
                    return
                try:
                    t = Timer()
                    t0 = time.perf_counter()
                    batch, stats = collect(run, t, step=step)
                    self.ready.put((step, batch, stats, time.perf_counter() - t0))
                except BaseException as e:  # handed to the loop, which stops with it
                    self.ready.put(e)
                    return
                step += 1

        self.thread = threading.Thread(target=work, args=(run.counters.step,), daemon=True, name="lmpo-prefetch")
        self.thread.start()

    def next(self, t) -> tuple:
        t0 = time.perf_counter()
        timeout = self.run.cfg.distributed.ray_timeout_s
        try:
            item = self.ready.get(timeout=timeout)
        except queue.Empty:
            raise WorkerError(f"no rollout batch arrived within distributed.ray_timeout_s={timeout} s.") from None
        t["rollout_wait"] = t.get("rollout_wait", 0.0) + time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        step, batch, stats, collect_s = item
        if step != self.run.counters.step:
            raise WorkerError(f"asynchronous collection is out of order: got step {step}, the learner is at "
                              f"{self.run.counters.step}.")
        lag = self.run.counters.step - batch.policy_version.float()
        stats["async/staleness_mean"] = float(lag.mean())
        stats["async/staleness_max"] = float(lag.max())
        stats["async/collect_s"] = collect_s
        if float(lag.max()) > self.K:     # cannot happen by construction (the thread waits); never trained on
            raise WorkerError(f"a batch {int(lag.max())} updates old arrived, past distributed.max_staleness={self.K}.")
        return batch, stats

    def close(self):
        self.stop.set()
        self.thread.join(timeout=self.run.cfg.distributed.ray_timeout_s)


def attach_workers(run, pg=None):
    """In the learner: rollout and reward worker pools (their actors in placement group ``pg``), and
    the asynchronous collector when ``max_staleness`` > 0. Their actors are stopped by ``run.rollout.close()``."""
    run.rollout.engine = RolloutPool(run, pg)
    run.rollout.closers.append(run.rollout.engine.close)
    run.rollout.scorer = RewardPool(run, pg)
    run.rollout.closers.append(run.rollout.scorer.close)
    if run.cfg.distributed.max_staleness > 0:
        run.rollout.prefetch = Prefetch(run, run.cfg.distributed.max_staleness)
        run.rollout.closers.append(run.rollout.prefetch.close)
    if run.world.main:                            # who is who, for operators (and the worker-kill test)
        out = Path(run.cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ray_workers.json").write_text(json.dumps({
            "learner": os.getpid(), "rollout": run.rollout.engine.workers.pids,
            "reward": run.rollout.scorer.workers.pids}))
