"""AdamW's moments allocated when the run is built, gradients freed after each optimizer step: the
same numbers as torch's lazy state, less memory held across the step."""

from __future__ import annotations

import torch
from conftest import rl_config


def test_adamw_state_allocated_up_front_gives_the_lazy_steps_and_keeps_a_resumed_state():
    from lmpo.rl.setup import allocate_state

    torch.manual_seed(0)
    lazy_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    early_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    early_model.load_state_dict(lazy_model.state_dict())
    early_model[1].bias.requires_grad_(False)
    lazy_model[1].bias.requires_grad_(False)
    lazy = torch.optim.AdamW(lazy_model.parameters(), lr=1e-2, weight_decay=0.1)
    early = torch.optim.AdamW(early_model.parameters(), lr=1e-2, weight_decay=0.1)
    allocate_state(early)
    assert not lazy.state
    for p in early_model.parameters():              # zeros and step 0 before any step, no gradient left
        if p.requires_grad:
            st = early.state[p]
            assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
        assert p.grad is None
    assert not early.state[early_model[1].bias]     # a frozen parameter gets no state
    for i in range(3):
        x = torch.randn(5, 4)
        for model, opt in ((lazy_model, lazy), (early_model, early)):
            model(x).pow(2).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(lazy_model.parameters(), early_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(lazy.state_dict()["state"].values(), early.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    kept = {k: v.clone() for k, v in early.state[early_model[0].weight].items()}
    allocate_state(early)                            # a state already there (a resumed run) is left alone
    assert all(torch.equal(kept[k], early.state[early_model[0].weight][k]) for k in kept)


def test_ppo_run_holds_its_moments_from_the_start_and_no_gradient_between_steps(sft_dir, tmp_path):
    from lmpo.rl import loop as rl
    from lmpo.rl.loop import start

    run = start(rl_config(sft_dir, tmp_path / "ppo", algorithm="ppo", group_size=1, beta=0.04))
    assert len(run.optimizers) == 2                  # the policy's and the separate critic's
    for opt in run.optimizers:
        assert all(float(opt.state[p]["step"]) == 0 for g in opt.param_groups for p in g["params"])
    batch, _ = rl.collect(run, rl.Timer())
    rl.prepare(run, batch)
    stats = rl.update(run, batch, rl.Timer())
    assert stats["train/skipped_steps"] == 0 and stats["grad_norm"] > 0
    for opt in run.optimizers:
        params = [p for g in opt.param_groups for p in g["params"]]
        assert all(p.grad is None for p in params), "gradients held after the optimizer step"
        assert all(float(opt.state[p]["step"]) == 1 for p in params)
