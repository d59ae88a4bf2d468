"""PPO's critic as one object: its values before the update, its value loss, its optimizer step and
its checkpoint state, for either kind (``ppo.critic``):

- ``separate``: a value model of its own (policy-sized, or a reward model's) with its own AdamW;
- ``shared``: a scalar head on the policy's last hidden states, trained by the policy's optimizer
  (its parameters sit in the policy's parameter group, so the policy's gradient clipping covers it).

The loop holds ``run.critic``, a ``Critic`` or, without one, a ``NoCritic`` with the same interface
that does nothing, and asks nothing: neither whether there is a critic nor which kind.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from lmpo import algorithms as A
from lmpo.models.value import ValueHead, load_value_model, param_bytes, token_values
from lmpo.parallel import torchrun as D
from lmpo.rl.forward import completion_logp, sequence_inputs


class Critic:
    """V(s_t) for every completion token. ``model``: the value model (separate) or the value head
    (shared); ``optimizer``: the separate model's (None when shared: the policy's optimizer steps it)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *, shared: bool,
                 vf_coef: float, value_clip: float | None, bf16: bool = False):
        self.model, self.optimizer, self.shared = model, optimizer, shared
        self.vf_coef, self.value_clip, self.bf16 = vf_coef, value_clip, bf16

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    # ------------------------------------------------------------------ forward

    def _forward(self, batch) -> torch.Tensor:
        ids, attn, pos = sequence_inputs(batch)
        with self._autocast(ids.device):
            return token_values(self.model, ids, attn, pos, batch.completion_ids.shape[1]).float()

    @torch.no_grad()
    def fill_values(self, policy, batch, temperature: float, keep_graph: bool = False):
        """batch.values [N, T] before the update. ``keep_graph`` (a separate critic whose update is
        one optimizer step on one micro-batch): the forward keeps its graph in ``batch.values_live``
        for the value loss, so it runs once instead of twice."""
        if self.shared:
            _, _, batch.values = completion_logp(policy, batch, temperature, value_head=self.model)
        elif keep_graph:
            with torch.enable_grad():
                batch.values_live = self._forward(batch)
            batch.values = batch.values_live.detach()
        else:
            batch.values = self._forward(batch)

    def add_value_loss(self, mb, totals: dict, objective) -> tuple[torch.Tensor, dict]:
        """The micro-batch's policy loss + vf_coef · L_V, with the stats of both. ``objective(value_head)``
        is the policy's forward and loss: ``(loss, stats, values)``, ``values`` from ``value_head`` on the
        policy's last hidden states (None without one). The critic orders the work around it:

        - separate: its value loss is back-propagated first, through the graph ``fill_values`` kept
          (``mb.values_live``) or a forward of its own, so its graph is freed before the policy's is
          built (one graph alive at the peak, not two; the same gradients, the graphs share nothing);
          the returned loss is the policy's alone;
        - shared: the policy's forward gives the values; the value loss joins the policy's loss."""
        if self.shared:
            loss, stats, values = objective(self.model)
            vl, critic_stats = self._value_loss(mb, values, totals)
            return loss + vl, {**stats, **critic_stats}
        vl, critic_stats = self._value_loss(mb, mb.values_live if mb.values_live is not None else self._forward(mb),
                                            totals)
        vl.backward()
        loss, stats, _ = objective(None)
        return loss, {**stats, **critic_stats}

    def _value_loss(self, mb, values: torch.Tensor, totals: dict) -> tuple[torch.Tensor, dict]:
        """vf_coef · L_V over the minibatch's real tokens (token mean over ``global_tokens``), with
        L_V = ½·max((V − R)², (clip(V, V_old ± ε) − R)²) (``lmpo.algorithms.value_loss``)."""
        vl = A.aggregate_loss(A.value_loss(values, mb.values, mb.returns, mb.mask, self.value_clip), mb.mask,
                              mode="token-mean", global_tokens=totals["global_tokens"])
        return self.vf_coef * vl, {"critic/loss": vl.item()}

    def optimizers(self) -> list:
        """The separate model's optimizer (the loop zeroes, clips and steps it with the policy's);
        none when shared."""
        return [self.optimizer] if self.optimizer is not None else []

    # ------------------------------------------------------------------ state

    def saved_models(self) -> dict:
        """HF models the checkpoint writes with save_pretrained."""
        return {"critic": None if self.shared else self.model}

    def state(self) -> dict:
        """What the checkpoint's state.pt holds for the critic."""
        if self.shared:
            return {"value_head": self.model.state_dict()}
        return {"critic_optimizer": self.optimizer.state_dict()}

    def load(self, states: dict):
        if self.shared and "value_head" in states:
            self.model.load_state_dict(states["value_head"])
        elif not self.shared and "critic_optimizer" in states:
            self.optimizer.load_state_dict(states["critic_optimizer"])

    def parameters(self):
        return self.model.parameters()

    def shared_parameters(self) -> list:
        """What the policy's optimizer trains besides the policy (and clips with it): the shared head."""
        return list(self.model.parameters()) if self.shared else []

    def state_bytes(self) -> dict:
        """{"critic": bytes} of the separate model (parameters, gradients, optimizer state) for
        summary.json; none when shared (the head is counted with the policy's optimizer)."""
        return {} if self.shared else {"critic": param_bytes(self.model, self.optimizer)}


class NoCritic:
    """No critic (GRPO and every critic-free estimator): the ``Critic`` interface, doing nothing."""

    def fill_values(self, policy, batch, temperature: float, keep_graph: bool = False):
        pass                                    # batch.values stays None

    def add_value_loss(self, mb, totals: dict, objective) -> tuple[torch.Tensor, dict]:
        loss, stats, _ = objective(None)        # the policy's objective alone
        return loss, stats

    def optimizers(self) -> list:
        return []

    def saved_models(self) -> dict:
        return {}

    def state(self) -> dict:
        return {}

    def load(self, states: dict):
        pass

    def parameters(self):
        return iter(())

    def shared_parameters(self) -> list:
        return []

    def state_bytes(self) -> dict:
        return {}


def make_critic(cfg, kind: str | None, policy, model_dir: str, tokenizer, device, world, ckpt: Path | None):
    """The critic ``ppo.critic`` asks for (``NoCritic`` for none): a separate value model, resumed from
    the checkpoint, started from the policy (``ppo.critic_init: policy``) or from a reward model; or a
    value head on the policy."""
    if kind is None:
        return NoCritic()
    common = dict(vf_coef=cfg.ppo.vf_coef, value_clip=cfg.ppo.value_clip, bf16=cfg.dtype == "bfloat16")
    if kind == "shared":
        head = D.prepare_model(ValueHead(policy.config.hidden_size).to(device), world)
        return Critic(head, None, shared=True, **common)
    if ckpt and (ckpt / "critic").exists():
        model = load_value_model(str(ckpt / "critic"), tokenizer, from_reward_model=True).to(device)
    elif cfg.ppo.critic_init == "policy":
        model = load_value_model(model_dir, tokenizer).to(device)
    else:
        model = load_value_model(cfg.ppo.critic_init, tokenizer, from_reward_model=True).to(device)
    model = D.prepare_model(model, world)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.ppo.critic_learning_rate or cfg.learning_rate * 5,
                            weight_decay=cfg.weight_decay)
    return Critic(model, opt, shared=False, **common)
