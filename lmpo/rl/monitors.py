"""Monitors: signals of collapse, drift and reward hacking every step, and alarms on them.

Every step adds ``monitor/*`` metrics; a rule whose condition holds ``monitor.patience``
consecutive measured steps (after ``monitor.warmup_steps``) raises an alarm: a warning and a line
in ``output_dir/alarms.jsonl``, and with ``monitor.action: stop`` the run stops after the step is
logged, writes a checkpoint and exits with status 2 (``MonitorAlarm``). Thresholds are in
``MonitorConfig``; null turns a rule off. docs/monitoring.md explains each signal.

Trends compare two windows of ``monitor.window`` steps: the first after warmup (the baseline)
and the latest. The state (histories, the KL probe) lives in ``run.counters.monitor``, so a
resumed run continues its trends.

    collapse  distinct_frac     mean over groups of |distinct completions| / G
              group_similarity  mean over pairs i<j of a group of J(i, j), J the Jaccard index of
                                the sets of token bigrams
              entropy           mean token entropy of π (the loop's ``entropy``)
              zero_std_frac     fraction of groups whose rewards are all equal
    drift     kl_start          KL(π_start ‖ π_θ) per token on a fixed probe of start-policy samples:
                                mean over probe tokens of k3 = ρ − 1 − log ρ, ρ = π_θ / π_start
              length_ratio      latest-window mean completion length / baseline's
              truncated_frac    latest-window truncation rate
    hacking   reward_divergence (R̄_latest − R̄_base)/σ_R − (V̄_latest − V̄_base)/σ_V: the training
                                reward's gain minus the verifier's, each in its baseline per-sample std
              eval_drop         best held-out eval accuracy − the latest (while training reward held)
              component_drop/f  baseline − latest mean of reward function f (while the total rose)
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from lmpo.errors import MonitorAlarm  # noqa: F401 (its home is lmpo.errors; imported from here too)
from lmpo.io.logging import read_metrics
from lmpo.rewards.combine import resolve_reward_funcs
from lmpo.rl.forward import completion_logp
from lmpo.rollout import RolloutBatch


# ----------------------------------------------------------------------------- signals (pure)


def distinct_fraction(completions: list[str], group_size: int) -> float:
    """Mean over groups of (number of distinct completions) / G."""
    groups = [completions[i:i + group_size] for i in range(0, len(completions), group_size)]
    return sum(len(set(g)) / len(g) for g in groups) / max(1, len(groups))


def _bigrams(ids: list[int]) -> set:
    return set(zip(ids, ids[1:])) if len(ids) > 1 else {tuple(ids)}


def group_similarity(completion_ids: torch.Tensor, mask: torch.Tensor, group_size: int) -> float:
    """Mean over the pairs (i < j) of each group of the Jaccard index |A ∩ B| / |A ∪ B| of their sets of
    token bigrams (real tokens only; a one-token completion is its own unigram)."""
    seqs = [_bigrams(row[m > 0].tolist()) for row, m in zip(completion_ids.cpu(), mask.cpu())]
    total, pairs = 0.0, 0
    for s in range(0, len(seqs), group_size):
        g = seqs[s:s + group_size]
        for i in range(len(g)):
            for j in range(i + 1, len(g)):
                union = len(g[i] | g[j])
                total += len(g[i] & g[j]) / union if union else 1.0
                pairs += 1
    return total / pairs if pairs else float("nan")


def probe_kl(logp: torch.Tensor, logp_start: torch.Tensor, mask: torch.Tensor) -> float:
    """KL(π_start ‖ π_θ) per token from tokens sampled by π_start: mean of k3 = ρ − 1 − log ρ over real
    tokens, ρ = exp(logp − logp_start) (unbiased, never negative)."""
    m = mask > 0
    log_ratio = (logp - logp_start)[m].double()
    return float((log_ratio.exp() - 1 - log_ratio).mean()) if m.any() else 0.0


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- the monitor


class Monitors:
    """The loop calls ``watch(run, batch, metrics)`` before logging a step and ``enforce()`` after."""

    def __init__(self, cfg, group_size: int, output_dir, state: dict, verifier=None, main: bool = True,
                 stop: bool = True):
        self.cfg, self.G, self.out = cfg, group_size, Path(output_dir)
        self.state, self.verifier, self.main = state, verifier, main
        self.stop = stop and cfg.action == "stop"
        self.pending: list[str] = []
        for key in ("hist", "streak", "fired"):
            state.setdefault(key, {})

    @classmethod
    def for_run(cls, run) -> "Monitors":
        cfg = run.cfg.monitor
        if not cfg.enabled:
            return _Off()
        verifier = None
        if cfg.verifier:
            verifier = resolve_reward_funcs([cfg.verifier])[0][1]
        stop = not run.world.multi       # torchrun: each rank sees its own share, so alarms only warn
        return cls(cfg, run.cfg.group_size, run.cfg.output_dir, run.counters.monitor, verifier,
                   main=run.world.main, stop=stop)

    # -- per step

    def watch(self, run, batch, metrics: dict) -> None:
        """Add this step's ``monitor/*`` signals to ``metrics``; check the rules; warn about new alarms."""
        sig = self.signals(run, batch, metrics)
        hist = self.state["hist"]
        for k, v in sig.items():
            hist.setdefault(k, []).append(v)
        out = {f"monitor/{k}": v for k, v in sig.items() if not k.startswith("_")}
        checks = self.checks(set(sig))
        out.update({f"monitor/{k}": v for k, (v, _) in checks.items() if not k.startswith("_")})
        new, step = [], run.counters.step
        for name, (value, over) in checks.items():
            streak = self.state["streak"].get(name, 0) + 1 if over else 0
            self.state["streak"][name] = streak
            need = SPARSE_PATIENCE if name in ("kl_start", "eval_drop") else self.cfg.patience
            if over and streak >= need and step > self.cfg.warmup_steps and name not in self.state["fired"]:
                self.state["fired"][name] = step
                new.append(self._alarm(step, name, value))
        out["monitor/alarms"] = len(self.state["fired"])
        metrics.update(out)
        if new and self.stop:
            self.pending = new

    def enforce(self) -> None:
        if self.pending:
            msg = "; ".join(self.pending)
            self.pending = []
            raise MonitorAlarm(f"monitor alarm (monitor.action=stop): {msg}. A checkpoint was written; "
                               "see alarms.jsonl and docs/monitoring.md.")

    def _alarm(self, step: int, name: str, value: float) -> str:
        op, key, kind = RULES[name.split("/")[0]]
        threshold = getattr(self.cfg, key)
        msg = f"{kind}: {name} = {value:.4g} at step {step} (alarm when {op} {threshold})"
        if self.main:
            warnings.warn(f"monitor alarm: {msg}", stacklevel=3)
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / "alarms.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "rule": name, "kind": kind, "value": value,
                                    "threshold": threshold}) + "\n")
        return msg

    # -- signals measured this step (missing = not measured)

    def signals(self, run, batch, metrics: dict) -> dict:
        G = self.G
        mask = batch.mask
        sig = {"entropy": metrics.get("entropy"), "zero_std_frac": metrics.get("frac_zero_std_groups"),
               "_length": metrics.get("completion/mean_length"), "_truncated": metrics.get("completion/truncated_frac"),
               "_reward": metrics.get("reward/mean"), "_reward_std": metrics.get("reward/std")}
        if G > 1 and len(batch) % G == 0:
            sig["distinct_frac"] = distinct_fraction(batch.completions, G)
            sig["group_similarity"] = group_similarity(batch.completion_ids, mask, G)
        kl = self._probe_kl(run, batch)
        if kl is not None:
            sig["kl_start"] = kl
        if self.verifier is not None:
            sig["verifier_mean"], sig["_verifier_std"] = self._verify(batch)
        if "eval/greedy_accuracy" in metrics:
            sig["_eval"] = metrics["eval/greedy_accuracy"]
        for k, v in metrics.items():
            if k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean":
                sig[f"_fn/{k[len('reward/'):-len('/mean')]}"] = v
        return {k: float(v) for k, v in sig.items() if v is not None}

    @torch.no_grad()
    def _probe_kl(self, run, batch):
        st = self.state
        if "probe" not in st:               # the first batch: samples of the start policy and their log-probs
            n = min(self.cfg.probe_size, len(batch))
            probe = batch.select(torch.arange(n))
            start = probe.old_logp if probe.old_logp is not None else probe.sampler_logp
            st["probe"] = {k: getattr(probe, k).detach().cpu() for k in
                           ("prompt_ids", "prompt_mask", "completion_ids", "mask") if getattr(probe, k) is not None}
            st["probe"]["seq_mask"] = None if probe.seq_mask is None else probe.seq_mask.cpu()
            st["probe"]["logp_start"] = start.detach().float().cpu()
            return None
        if run.counters.step % self.cfg.kl_every:
            return None
        p = st["probe"]
        dev = batch.mask.device
        probe = RolloutBatch(prompt_ids=p["prompt_ids"].to(dev), prompt_mask=p["prompt_mask"].to(dev),
                             completion_ids=p["completion_ids"].to(dev), mask=p["mask"].to(dev),
                             sampler_logp=p["logp_start"].to(dev), truncated=torch.zeros(len(p["mask"]), dtype=torch.bool),
                             group_size=1, seq_mask=None if p["seq_mask"] is None else p["seq_mask"].to(dev))
        logp, _, _ = completion_logp(run.actor.model, probe, run.cfg.temperature)
        return probe_kl(logp.float(), probe.sampler_logp, probe.mask)

    def _verify(self, batch):
        columns = {k: [r.get(k) for r in batch.rows] for k in batch.rows[0] if k != "prompt"}
        vals = [float(v) for v in self.verifier(batch.prompts, batch.completions, **columns) if v is not None]
        if not vals:
            return None, None
        m = sum(vals) / len(vals)
        return m, (sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1)) ** 0.5

    # -- rules: name -> (value, condition holds)

    def checks(self, measured: set) -> dict:
        """Each rule's value and whether its condition holds, for the rules measured this step."""
        cfg, h, out = self.cfg, self.state["hist"], {}
        for name in ("distinct_frac", "entropy", "group_similarity", "zero_std_frac", "kl_start"):
            op, key, _ = RULES[name]
            if getattr(cfg, key) is not None and name in measured:
                v = h[name][-1]
                out[name] = (v, v < getattr(cfg, key) if op == "<" else v > getattr(cfg, key))
        if cfg.max_truncated_frac is not None and "_truncated" in h:
            v = _mean(h["_truncated"][-cfg.window:])
            out["truncated_frac"] = (v, v > cfg.max_truncated_frac)
        base, recent = self._windows("_length")
        if base is not None and cfg.max_length_ratio is not None and base > 0:
            r = recent / base
            out["length_ratio"] = (r, r > cfg.max_length_ratio or r < 1 / cfg.max_length_ratio)
        out.update(self._hacking())
        return out

    def _windows(self, key: str):
        """(baseline mean, latest mean) of a per-step signal, once a full window follows warmup."""
        vals = self.state["hist"].get(key, [])
        w, skip = self.cfg.window, self.cfg.warmup_steps
        if len(vals) < skip + w:
            return None, None
        return _mean(vals[skip:skip + w]), _mean(vals[-w:])

    def _hacking(self) -> dict:
        cfg, h, out = self.cfg, self.state["hist"], {}
        evals = self.state.setdefault("evals", [])          # (held-out accuracy, latest-window training reward)
        if len(h.get("_eval", [])) > len(evals):
            evals.append((h["_eval"][-1], _mean(h["_reward"][-cfg.window:])))
            best = max(evals, key=lambda e: e[0])
            if cfg.max_eval_drop is not None:
                drop = best[0] - evals[-1][0]
                out["eval_drop"] = (drop, drop > cfg.max_eval_drop and evals[-1][1] >= best[1])
        r_base, r_now = self._windows("_reward")
        if r_base is None:
            return out
        if self.verifier is not None and cfg.max_reward_divergence is not None:
            v_base, v_now = self._windows("verifier_mean")
            s_r, _ = self._windows("_reward_std")
            s_v, _ = self._windows("_verifier_std")
            if v_base is not None:
                d = (r_now - r_base) / (s_r + 1e-3) - (v_now - v_base) / (s_v + 1e-3)
                out["reward_divergence"] = (d, d > cfg.max_reward_divergence)
        if cfg.max_component_drop is not None:
            for key in [k for k in h if k.startswith("_fn/")]:
                b, now = self._windows(key)
                if b is not None and math.isfinite(b) and math.isfinite(now):
                    drop = b - now
                    out[f"component_drop/{key[4:]}"] = (drop, drop > cfg.max_component_drop and r_now > r_base)
        return out


SPARSE_PATIENCE = 2   # kl_start and eval_drop are measured every kl_every / eval_steps: 2 measurements in a row

# rule -> (comparison shown in the alarm, MonitorConfig threshold key, kind)
RULES = {
    "distinct_frac": ("<", "min_distinct_frac", "collapse"),
    "group_similarity": (">", "max_group_similarity", "collapse"),
    "entropy": ("<", "min_entropy", "collapse"),
    "zero_std_frac": (">", "max_zero_std_frac", "collapse"),
    "kl_start": (">", "max_kl_start", "drift"),
    "length_ratio": ("outside 1/r..r, r =", "max_length_ratio", "drift"),
    "truncated_frac": (">", "max_truncated_frac", "drift"),
    "reward_divergence": (">", "max_reward_divergence", "hacking"),
    "eval_drop": (">", "max_eval_drop", "hacking"),
    "component_drop": (">", "max_component_drop", "hacking"),
}


class _Off:
    """``monitor.enabled: false``."""

    pending: list = []

    def watch(self, run, batch, metrics):
        pass

    def enforce(self):
        pass


# ----------------------------------------------------------------------------- one line of state


def monitor_line(output_dir) -> str:
    """The monitors' state of a finished (or running) run in one line, from its metrics.jsonl and
    alarms.jsonl: ``monitors ok`` or the alarms, then the latest value of each signal."""
    out = Path(output_dir)
    rows = read_metrics(out)
    if not rows:
        return "monitors: no metrics"
    last = {}
    for r in rows:                                       # the latest measured value of each signal
        last.update({k: v for k, v in r.items() if k.startswith("monitor/") and v is not None})
    alarms_path = out / "alarms.jsonl"
    alarms = [json.loads(x) for x in alarms_path.read_text().splitlines() if x.strip()] if alarms_path.exists() else []
    head = (f"monitors: {len(alarms)} ALARM{'S' if len(alarms) > 1 else ''} ("
            + ", ".join(f"{a['rule']} {a['value']:.3g} @ {a['step']}" for a in alarms) + ")") if alarms \
        else f"monitors ok over {len(rows)} steps"
    shown = [("distinct_frac", "distinct"), ("group_similarity", "similarity"), ("entropy", "entropy"),
             ("zero_std_frac", "zero-std groups"), ("kl_start", "KL(start)"), ("length_ratio", "length ×"),
             ("truncated_frac", "truncated"), ("reward_divergence", "reward−verifier"), ("eval_drop", "eval drop")]
    parts = [f"{label} {last['monitor/' + key]:.2f}" for key, label in shown if f"monitor/{key}" in last]
    return " | ".join([head] + parts)
