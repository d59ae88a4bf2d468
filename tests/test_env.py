"""Environments and multi-turn rollouts: environment tokens are context but never loss, bounds hold,
resettable groups share a state and non-resettable ones do not (GRPO refuses them unless allowed),
TRL-style classes work through the adapter, chat templates frame the turns, and a run trains."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, rl_config, read_jsonl
from lmpo.config import ConfigError
from lmpo.data import addition_rows
from lmpo.rollout.env import TRLEnvironment, env_rollout, parse_tool_calls, resolve_env
from lmpo.rollout.sampler import SamplingSpec


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lmpo.models.load import load_causal_lm, load_tokenizer
    from lmpo.models.tiny import build_tiny

    d = build_tiny(tmp_path_factory.mktemp("env_tiny"), seed=0, **TINY)
    return load_causal_lm(str(d)), load_tokenizer(str(d)), d


class Echo:
    """Never ends: every turn is answered with a fixed observation."""

    resettable = True

    def reset(self, row, seed):
        return "1+1="

    def step(self, text):
        return "ok 2+2=", 0.25, False


def play(model, tok, factory, n_rows=2, G=3, **kw):
    args = dict(group_size=G, max_new_tokens=4, max_turns=3, max_tokens=24)
    args.update(kw)
    bounds = {k: args.pop(k) for k in ("max_turns", "max_tokens")}
    envs = [factory() for _ in range(n_rows * G)]
    return env_rollout(model, tok, envs, addition_rows(n_rows, 0), list(range(1, n_rows + 1)), SamplingSpec(**args),
                       **bounds)


def test_environment_tokens_are_context_but_not_loss(tiny):
    from lmpo.rl.forward import completion_logp

    model, tok, _ = tiny
    b = play(model, tok, Echo)
    obs = tok("ok 2+2=", add_special_tokens=True)["input_ids"]
    for i in range(len(b)):
        ids = b.completion_ids[i][b.seq_mask[i] > 0].tolist()
        env_pos = ((b.seq_mask[i] > 0) & (b.mask[i] == 0)).nonzero().squeeze(-1).tolist()
        env_ids = [ids[p] for p in env_pos]
        turns = b.rows[i]["env_turns"]
        assert env_ids == obs * (turns - 1)                    # exactly the observations are unmasked-from-loss
        assert b.sampler_logp[i][b.mask[i] == 0].abs().sum() == 0
    # the training forward attends to the environment's tokens: its log-probs of the model's tokens equal
    # the sampler's, which were computed with those tokens in the context
    logp, _, _ = completion_logp(model, b, 1.0)
    assert torch.allclose(logp * b.mask, b.sampler_logp, atol=1e-4)
    assert (logp[b.mask == 0] == 0).all()
    # and without seq_mask (environment tokens hidden) they would differ
    hidden = b.select(torch.arange(len(b)))
    hidden.seq_mask = None
    logp2, _, _ = completion_logp(model, hidden, 1.0)
    assert not torch.allclose(logp2 * b.mask, b.sampler_logp, atol=1e-3)


def test_turn_and_token_bounds(tiny):
    model, tok, _ = tiny
    b = play(model, tok, Echo, max_turns=2, max_tokens=30)
    assert all(r["env_turns"] == 2 for r in b.rows) and b.truncated.all()
    b = play(model, tok, Echo, max_turns=10, max_tokens=12)
    assert int(b.seq_mask.sum(-1).max()) <= 12 and b.truncated.all()
    # turn rewards sit on each turn's last model token and add up to env_reward
    for i, r in enumerate(b.rows):
        ends = r["env_turn_ends"]
        assert all(b.mask[i, e] == 1 for e in ends)
        assert float(b.turn_rewards[i].sum()) == pytest.approx(r["env_reward"]) == pytest.approx(0.25 * len(ends))


def test_resettable_groups_start_from_one_state_and_non_resettable_do_not(tiny):
    model, tok, _ = tiny
    G = 4
    b = play(model, tok, resolve_env("addition_retry"), G=G)
    assert all(len(set(b.prompts[g:g + G])) == 1 for g in range(0, len(b), G))
    b = play(model, tok, resolve_env("addition_chain"), G=G)
    assert all(len(set(b.prompts[g:g + G])) > 1 for g in range(0, len(b), G))
    again = play(model, tok, resolve_env("addition_chain"), G=G)     # seeded: reproducible all the same
    assert again.prompts == b.prompts and torch.equal(again.completion_ids, b.completion_ids)


def test_builtin_environments_reward_by_hand():
    retry = resolve_env("addition_retry")()
    assert retry.reset({"prompt": "12+30=", "answer": "42"}, 0) == "12+30="
    assert retry.step("41") == ("no 12+30=", 0.0, False)
    assert retry.step("42") == (None, 0.5, True)
    retry.reset({"prompt": "12+30=", "answer": "42"}, 0)
    assert retry.step("42") == (None, 1.0, True)
    chain = resolve_env("addition_chain")()
    first = chain.reset({"prompt": "ignored"}, 7)
    a, b = map(int, first[:-1].split("+"))
    obs, r, done = chain.step(str(a + b))
    x, c = map(int, obs[:-1].split("+"))
    assert (r, done, x) == (1.0, False, a + b)
    assert chain.step(str(x + c)) == (None, 1.0, True)


class Counter:
    """A TRL-style environment: reset(**row), a public tool method, get_reward()."""

    def reset(self, **kwargs):
        self.total = 0
        return " (use the add tool)"

    def add(self, n: int) -> str:
        self.total += int(n)
        return f"total {self.total}"

    def get_reward(self) -> float:
        return float(self.total == 5)


def test_trl_style_class_through_the_adapter(tiny):
    assert parse_tool_calls('x <tool_call>{"name": "add", "arguments": {"n": 2}}</tool_call>') == [("add", {"n": 2})]
    assert parse_tool_calls("just an answer") == []
    env = resolve_env(Counter)()
    assert isinstance(env, TRLEnvironment) and env.resettable and set(env.tools) == {"add"}
    assert env.reset({"prompt": "count", "answer": "5"}, 0) == "count (use the add tool)"
    assert env.step('<tool_call>{"name": "add", "arguments": {"n": 2}}</tool_call>') == \
        ({"role": "tool", "content": "total 2"}, 0.0, False)
    assert env.step('{"name": "add", "arguments": {"n": 3}}')[0]["content"] == "total 5"
    assert env.step('{"name": "nope", "arguments": {}}')[0]["content"].startswith("error: no tool")
    assert env.step("done") == (None, 1.0, True)                 # no tool call: the episode ends with get_reward
    model, tok, _ = tiny                                         # and it plays in a rollout
    b = play(model, tok, resolve_env(Counter), n_rows=1, G=2)
    assert b.prompts[0].endswith("(use the add tool)") and all(r["env_turns"] >= 1 for r in b.rows)


CHATML = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
          "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_chat_template_frames_the_turns_and_keeps_model_tokens(tiny):
    model, tok, _ = tiny
    tok = type(tok).from_pretrained(str(tiny[2]))
    tok.chat_template = CHATML
    b = play(model, tok, Echo, n_rows=1, G=2, max_turns=2, max_tokens=40)
    assert b.prompts[0] == "<user>1+1=<eos><assistant>"
    for i in range(len(b)):
        if b.rows[i]["env_turns"] < 2:
            continue
        ids = b.completion_ids[i][b.seq_mask[i] > 0]
        m = b.mask[i][b.seq_mask[i] > 0]
        env_text = tok.decode(ids[m == 0].tolist(), skip_special_tokens=False)
        first_turn = ids[: int(b.rows[i]["env_turn_ends"][0]) + 1].tolist()
        if first_turn[-1] == tok.eos_token_id:           # the model closed its turn: the template adds the rest
            assert env_text == "<user>ok 2+2=<eos><assistant>"
        else:
            assert env_text.endswith("<user>ok 2+2=<eos><assistant>")


def test_turn_token_rewards_by_hand():
    from lmpo.algorithms import turn_token_rewards

    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float)
    turns = torch.tensor([[0, 0.5, 0, 0, 0, 1.0], [0, 0, 2.0, 0, 0, 0]])
    R = torch.tensor([2.0, 3.0])                     # w * turns + 0.5 (row 0) / + 1.0 (row 1) from another source
    out = turn_token_rewards(R, turns, 1.0, mask)
    assert torch.equal(out, torch.tensor([[0, 0.5, 0, 0, 0, 1.5], [0, 0, 3.0, 0, 0, 0]]))
    assert torch.allclose(out.sum(-1), R)
    # with the KL in the reward (PPO) the turn rewards stay where they are and -beta * k1 is added per token
    from lmpo.algorithms import kl_in_reward

    logp, ref = torch.full((2, 6), -1.0), torch.full((2, 6), -1.5)
    assert torch.allclose(kl_in_reward(out, logp, ref, mask, 0.1), (out - 0.05) * mask)


def test_grpo_refuses_a_non_resettable_environment_unless_allowed(sft_dir, tmp_path):
    from lmpo.rl.loop import start

    cfg = rl_config(sft_dir, tmp_path / "a", **{"env.name": "addition_chain", "reward_funcs": ["env_reward"]})
    with pytest.raises(ConfigError, match="cannot be reset"):
        start(cfg)
    cfg = rl_config(sft_dir, tmp_path / "b", **{"env.name": "addition_chain", "reward_funcs": ["env_reward"],
                                                "algorithm": "reinforce_pp"})
    start(cfg).rollout.close()                                    # a batch baseline: no groups, no refusal
    cfg = rl_config(sft_dir, tmp_path / "c", **{"env.name": "addition_chain", "reward_funcs": ["env_reward"],
                                                "env.nonresettable_groups": "allow"})
    with pytest.warns(UserWarning, match="averages over states"):
        start(cfg).rollout.close()


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_training_on_an_environment(sft_dir, tmp_path, algorithm):
    from lmpo.rl.loop import train

    extra = {"ppo.critic": "separate"} if algorithm == "ppo" else {}
    cfg = rl_config(sft_dir, tmp_path, algorithm=algorithm, max_steps=3, **{"env.name": "addition_retry",
                    "env.max_turns": 2, "env.max_tokens": 16, "reward_funcs": ["env_reward"], **extra})
    train(cfg)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(rows) == 3 and all(r["reward/env_reward/mean"] is not None for r in rows)
    assert (tmp_path / "final" / "config.json").exists()
