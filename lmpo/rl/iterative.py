"""Iterative GRPO (DeepSeekMath, Algorithm 1): every K steps the reference model becomes the current
policy and, optionally, the reward model continues training on pairs drawn from the current
policy's samples, replaying a fraction (10 %) of historical pairs so it does not forget.

New pairs are labelled by the reward sources other than the reward model (verifiers): within a
group, the best-scored completion is ``chosen`` and the worst ``rejected`` when their scores differ.
The state across steps (new pairs, history) is ``Iterative``, a part of the run (``run.iterative``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lmpo.stages.reward_model import FitSpec, continue_training


@dataclass
class Iterative:
    """Iterative GRPO's settings and its state across steps (checkpointed): the verifier-labelled
    pairs collected since the last reset and the pairs the reward model was trained on before."""

    reset_steps: int = 0                  # K: every K steps the reference becomes the policy (0: off)
    rm_retrain: bool = False              # retrain the reward model at each reset
    rm_replay: float = 0.1                # share of each retraining batch drawn from the history
    new_pairs: list = field(default_factory=list)
    history: list = field(default_factory=list)

    @classmethod
    def from_config(cls, cfg) -> "Iterative":
        it = cfg.iterative
        return cls(it.ref_reset_steps, it.rm_retrain, it.rm_replay)

    def add_pairs(self, prompts: list[str], completions: list[str], per_func: dict, weights: dict, group_size: int):
        """This batch's verifier-labelled (chosen, rejected) pairs, for the next reward-model update."""
        if self.rm_retrain:
            labels = verifier_labels(per_func, weights)
            self.new_pairs.extend(group_pairs(prompts, completions, labels, group_size))

    def after_step(self, step: int, policy, ref, reward_model, output_dir, seed: int, metrics: dict):
        """At every K-th step: the reference takes the policy's weights; with ``rm_retrain`` the
        reward model (``reward_model``: its scorer) continues training on the new pairs with replay."""
        if not self.reset_steps or step % self.reset_steps:
            return
        if ref is not None:
            metrics["iterative/kl_before_reset"] = metrics.get("kl", 0.0)
            ref.load_state_dict(policy.state_dict())
            metrics["iterative/reset"] = 1
        if self.rm_retrain and self.new_pairs:
            new, self.new_pairs = self.new_pairs, []
            metrics.update(retrain_reward_model(reward_model, new, self.history, output_dir, self.rm_replay,
                                                seed=seed + step))
            self.history.extend(new)

    def state(self) -> dict:
        return {"rm_new_pairs": self.new_pairs, "rm_history": self.history}

    def load(self, state: dict):
        self.new_pairs, self.history = state.get("rm_new_pairs", []), state.get("rm_history", [])


def group_pairs(prompts: list[str], completions: list[str], labels: list, group_size: int) -> list[dict]:
    """One (chosen, rejected) pair per group whose labels differ: best vs worst completion."""
    pairs = []
    for g in range(0, len(completions), group_size):
        idx = [i for i in range(g, g + group_size) if labels[i] is not None and labels[i] == labels[i]]
        if len(idx) < 2:
            continue
        best = max(idx, key=lambda i: labels[i])
        worst = min(idx, key=lambda i: labels[i])
        if labels[best] > labels[worst]:
            pairs.append({"prompt": prompts[best], "chosen": completions[best], "rejected": completions[worst]})
    return pairs


def verifier_labels(per_func: dict, weights: dict) -> list:
    """Σ w·r over the verifier functions (not the reward model) per sample; None where none scored."""
    names = [n for n in per_func if n != "reward_model"]
    n = len(next(iter(per_func.values()))) if per_func else 0
    out = []
    for i in range(n):
        vals = [(weights[k], per_func[k][i]) for k in names if per_func[k][i] is not None and per_func[k][i] == per_func[k][i]]
        out.append(sum(w * v for w, v in vals) if vals else None)
    return out


def retrain_reward_model(scorer, new_pairs: list[dict], history: list[dict], output_dir, replay_frac: float = 0.1,
                         steps: int = 50, lr: float = 1e-5, seed: int = 0) -> dict:
    """Continue training the reward model behind ``scorer`` on ``new_pairs`` with ``replay_frac`` of
    each batch drawn from ``history``. The user's reward-model directory is never written: the model
    is copied to ``output_dir/reward_model`` first and trained there; the scorer is reloaded."""
    own = Path(output_dir) / "reward_model"
    if Path(scorer.path).resolve() != own.resolve():
        if own.exists():
            shutil.rmtree(own)
        shutil.copytree(scorer.path, own)
        scorer.path = str(own)
    stats = continue_training(str(own), new_pairs, history, replay_frac=replay_frac, fit=FitSpec(steps=steps, lr=lr),
                              seed=seed)
    scorer.reload()
    return stats
