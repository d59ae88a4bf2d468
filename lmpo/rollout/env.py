"""Environments and multi-turn rollouts.

An environment is any object with

    resettable: bool                     # reset(row, seed) twice with the same arguments gives the same state
    reset(row, seed) -> observation      # the first observation: text, or a list of chat messages
    step(text) -> (observation, reward, done)   # the model's turn in; the next observation (text, a chat
                                                # message dict such as {"role": "tool", ...}, or None), the
                                                # turn's reward and whether the episode has ended

An episode alternates model turns and environment turns. The whole episode is one row of a
``RolloutBatch``: the first observation is the prompt; the completion is every later token, the
model's and the environment's, in order. ``mask`` (the loss mask) is 1 on the model's tokens only;
``seq_mask`` is 1 on every real token and is what the model attends to, so environment tokens are
in the context of later turns but never in the loss, the log-probs' sums, the entropy or the KL.
Each turn's reward sits on the turn's last model token (``turn_rewards`` [N, T]); the episode's
rewards also reach reward functions as the row columns ``env_reward`` (their sum),
``env_turn_rewards`` and ``env_turn_ends`` (see ``lmpo.rewards.env_reward``).

With a chat template the conversation is rendered with it (observations as user messages, or as
the message dicts the environment gives) and the tokens an environment turn adds are the
template's text after the model's own tokens; the model's sampled tokens are never re-tokenized.
Without one, an observation is encoded like a prompt (the tokenizer's special tokens included).

TRL-style environment classes (``reset(**row)`` returning None or text appended to the prompt,
public methods called as tools, an optional ``get_reward()``) work through ``TRLEnvironment``.

Bounds: at most ``max_turns`` model turns and ``max_tokens`` completion tokens per episode (model
and environment tokens together); ``max_new_tokens`` per model turn. An episode that hits a bound
before the environment ends it is marked truncated.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .batch import RolloutBatch
from .sampler import SamplingSpec, generate
from lmpo.config import ConfigError
from lmpo.data.envs import ENVIRONMENTS
from lmpo.data import DatasetError

GROUP_ESTIMATORS = ("group_norm", "group_mean", "batch_norm", "leave_one_out", "process")


# ----------------------------------------------------------------------------- resolving an environment


def resolve_env(spec):
    """A zero-argument factory of environments from a built-in name (``lmpo.data.envs``), a class or
    factory, ``module:Class`` or ``path/file.py:Class``. TRL-style classes (no ``step``) are wrapped
    in ``TRLEnvironment``."""
    if isinstance(spec, str):
        if spec in ENVIRONMENTS:
            factory = ENVIRONMENTS[spec]
        elif ":" in spec:
            factory = _import(spec)
        else:
            raise ConfigError(f"config key 'env.name': unknown environment '{spec}'; built-in: "
                              f"{', '.join(ENVIRONMENTS)}, or 'module:Class' / 'file.py:Class'.")
    else:
        factory = spec
    probe = factory()
    if not callable(getattr(probe, "reset", None)):
        raise ConfigError(f"config key 'env.name': environment '{spec}' has no callable reset().")
    if callable(getattr(probe, "step", None)):
        return factory
    return lambda: TRLEnvironment(factory())


def _import(spec: str):
    import importlib
    import importlib.util
    import sys

    target, name = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            s = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(target))[0], target)
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
        return getattr(module, name)
    except (ImportError, FileNotFoundError, AttributeError, SyntaxError) as e:
        raise ConfigError(f"config key 'env.name': cannot load environment '{spec}': {e}") from None


class TRLEnvironment:
    """A TRL ``environment_factory`` class as an lmpo environment.

    ``reset(row, seed)`` calls ``env.reset(**row)``; its text (if any) is appended to the row's
    prompt (to the last message's content for chat prompts). ``step(text)`` reads tool calls in the
    model's turn, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes/Qwen
    form) or a bare JSON object with ``name``; each is run on the environment's public method of
    that name and its result (or its error) comes back as a ``tool`` message. A turn without a
    tool call ends the episode, rewarded with ``get_reward()`` when the class has one (else 0, and
    the reward functions score the transcript). Resettable unless the class sets
    ``resettable = False``: TRL itself treats G rollouts of a prompt as a group."""

    def __init__(self, env):
        self.env = env
        self.resettable = bool(getattr(env, "resettable", True))
        self.tools = {n: getattr(env, n) for n, _ in inspect.getmembers(type(env), inspect.isfunction)
                      if not n.startswith("_") and n not in ("reset", "get_reward", "step")}

    def reset(self, row: dict, seed: int):
        extra = self.env.reset(**{k: v for k, v in row.items() if k != "environment"})
        prompt = row["prompt"]
        if not extra:
            return prompt
        if isinstance(prompt, list):
            last = dict(prompt[-1], content=f"{prompt[-1]['content']}{extra}")
            return list(prompt[:-1]) + [last]
        return f"{prompt}{extra}"

    def step(self, text: str):
        calls = parse_tool_calls(text)
        if not calls:
            reward = self.env.get_reward() if callable(getattr(self.env, "get_reward", None)) else 0.0
            return None, float(reward), True
        results = []
        for name, args in calls:
            fn = self.tools.get(name)
            try:
                out = fn(**args) if fn is not None else f"error: no tool named {name!r}"
            except Exception as e:  # noqa: BLE001 - a failing tool is the model's problem, shown to it
                out = f"error: {type(e).__name__}: {e}"
            results.append(str(out))
        return {"role": "tool", "content": "\n".join(results)}, 0.0, False


_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> list[tuple[str, dict]]:
    """[(name, arguments)] of the tool calls in a model turn (none when the text has none)."""
    blobs = _TOOL_CALL.findall(text) or ([text.strip()] if text.strip().startswith("{") else [])
    calls = []
    for blob in blobs:
        try:
            obj = json.loads(blob)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", {})
            calls.append((obj["name"], args if isinstance(args, dict) else {}))
    return calls


# ----------------------------------------------------------------------------- rendering turns


class Transcript:
    """One episode's conversation, and the tokens each environment turn adds to the sequence."""

    def __init__(self, tokenizer, first):
        self.tok = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        if self.chat:
            self.messages = list(first) if isinstance(first, list) else [{"role": "user", "content": str(first)}]
            self.text = tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        else:
            if isinstance(first, list):
                raise DatasetError("the environment's first observation is a list of chat messages but the "
                                   "tokenizer has no chat template.")
            self.text = str(first)

    @property
    def prompt(self) -> str:
        return self.text

    def observe(self, turn_ids: list[int], turn_text: str, observation) -> list[int]:
        """Token ids the environment's turn adds after the model's tokens ``turn_ids``."""
        if not self.chat:
            content = observation["content"] if isinstance(observation, dict) else str(observation)
            return self.tok(content, add_special_tokens=True)["input_ids"]
        before = self.text + self.tok.decode(turn_ids, skip_special_tokens=False)
        msg = observation if isinstance(observation, dict) else {"role": "user", "content": str(observation)}
        self.messages += [{"role": "assistant", "content": turn_text}, msg]
        self.text = self.tok.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        segment = self.text[len(os.path.commonprefix([before, self.text])):]
        return self.tok(segment, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- the multi-turn rollout


def episode_seeds(seeds: list[int], group_size: int, resettable: bool) -> list[int]:
    """reset seeds [B·G]: a resettable environment starts the G episodes of group j from the same state
    (seed j); one that cannot be reset gets a different seed for each episode."""
    if resettable:
        return [s for s in seeds for _ in range(group_size)]
    return [hash((s, k)) & 0x7FFFFFFF for s in seeds for k in range(group_size)]


@dataclass
class _Episodes:
    """N episodes under way: completion tokens (the model's and the environment's), the loss mask
    (1 = the model's token), the sampler's log-probs, each turn's last token and reward, and whether
    each episode is done / truncated."""

    n: int
    toks: list = field(init=False)
    loss: list = field(init=False)
    logp: list = field(init=False)
    turn_ends: list = field(init=False)
    turn_rewards: list = field(init=False)
    done: list = field(init=False)
    truncated: list = field(init=False)

    def __post_init__(self):
        for name in ("toks", "loss", "logp", "turn_ends", "turn_rewards"):
            setattr(self, name, [[] for _ in range(self.n)])
        self.done, self.truncated = [False] * self.n, [False] * self.n

    def add(self, i: int, ids: list[int], logp: list[float], loss: int):
        """Tokens joining episode i: the model's (loss 1, with their log-probs) or the environment's (loss 0)."""
        self.toks[i] += ids
        self.loss[i] += [loss] * len(ids)
        self.logp[i] += logp


@torch.no_grad()
def env_rollout(model, tokenizer, envs: list, rows: list[dict], seeds: list[int], spec: SamplingSpec, *,
                max_turns: int, max_tokens: int) -> RolloutBatch:
    """Play ``len(envs)`` = B·G episodes (G = ``spec.group_size`` per row, group by group) to the end or
    to the bounds and return them as one ``RolloutBatch``. Every model turn is one call of the
    sampler's ``generate`` on the alive episodes' contexts (at most ``spec.max_new_tokens`` each);
    episode k's turn t samples from its own seeded stream."""
    device = next(model.parameters()).device
    G = spec.group_size
    resettable = all(getattr(e, "resettable", False) for e in envs)
    reset_seeds = episode_seeds(seeds, G, resettable)
    ep_rows = [r for r in rows for _ in range(G)]
    scripts = [Transcript(tokenizer, env.reset(dict(row), s)) for env, row, s in zip(envs, ep_rows, reset_seeds)]
    prompts = [s.prompt for s in scripts]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    ep = _Episodes(len(envs))
    sample_seeds = [hash((s, k)) & 0x7FFFFFFF for s in seeds for k in range(G)]
    for turn in range(max_turns):
        alive = [i for i in range(ep.n) if not ep.done[i]]
        if not alive:
            break
        room = [max_tokens - len(ep.toks[i]) for i in alive]
        width = min(spec.max_new_tokens, max(room))
        ids, attn = _left_pad([prompt_ids[i] + ep.toks[i] for i in alive], tokenizer.pad_token_id, device)
        u = torch.cat([torch.rand(1, width, generator=torch.Generator().manual_seed(hash((sample_seeds[i], turn)) & 0x7FFFFFFF))
                       for i in alive]).clamp_(min=1e-12).to(device)
        out = generate(model, ids, attn, SamplingSpec(group_size=1, max_new_tokens=width, temperature=spec.temperature,
                                                      top_p=spec.top_p, top_k=spec.top_k),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, uniforms=u)
        for j, i in enumerate(alive):
            n = min(int(out["mask"][j].sum()), room[j])
            turn_ids = out["completion_ids"][j, :n].tolist()
            ep.add(i, turn_ids, out["sampler_logp"][j, :n].tolist(), loss=1)
            text = tokenizer.decode(turn_ids, skip_special_tokens=True)
            obs, reward, ended = envs[i].step(text)
            ep.turn_ends[i].append(len(ep.toks[i]) - 1)
            ep.turn_rewards[i].append(float(reward))
            if ended:
                ep.done[i] = True
                continue
            seg = scripts[i].observe(turn_ids, text, obs) if obs is not None else []
            if turn + 1 == max_turns or len(ep.toks[i]) + len(seg) >= max_tokens:
                ep.done[i] = ep.truncated[i] = True
                continue
            ep.add(i, seg, [0.0] * len(seg), loss=0)
    for i in range(ep.n):                    # out of turns: not ended by the environment
        ep.truncated[i] = ep.truncated[i] or not ep.done[i]
    return _episode_batch(tokenizer, prompt_ids, prompts, ep, ep_rows, G, device)


def _left_pad(seqs: list[list[int]], pad: int, device):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[i, width - len(s):] = 1
    return ids.to(device), attn.to(device)


def _right(seqs, fill, dtype, width):
    out = torch.full((len(seqs), width), fill, dtype=dtype)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=dtype)
    return out


def _episode_batch(tokenizer, prompt_ids, prompts, ep: _Episodes, rows, G, device):
    toks, turn_ends, turn_rewards = ep.toks, ep.turn_ends, ep.turn_rewards
    T = max(1, max(len(t) for t in toks))
    pids, pmask = _left_pad(prompt_ids, tokenizer.pad_token_id, device)
    comp = _right(toks, tokenizer.pad_token_id, torch.long, T).to(device)
    seq_mask = _right([[1.0] * len(t) for t in toks], 0.0, torch.float32, T).to(device)
    tr = torch.zeros(len(toks), T)
    for i, (ends, rs) in enumerate(zip(turn_ends, turn_rewards)):
        for e, r in zip(ends, rs):
            if e >= 0:
                tr[i, e] += r
    texts = [tokenizer.decode(t, skip_special_tokens=False) for t in toks]
    eos = tokenizer.eos_token or ""
    texts = [t[: -len(eos)] if eos and t.endswith(eos) else t for t in texts]
    out_rows = [dict(r, env_reward=sum(rs), env_turn_rewards=list(rs), env_turn_ends=list(e), env_turns=len(rs))
                for r, rs, e in zip(rows, turn_rewards, turn_ends)]
    return RolloutBatch(prompt_ids=pids, prompt_mask=pmask, completion_ids=comp,
                        mask=_right(ep.loss, 0.0, torch.float32, T).to(device),
                        sampler_logp=_right(ep.logp, 0.0, torch.float32, T).to(device),
                        truncated=torch.tensor(ep.truncated, device=device), group_size=G, prompts=list(prompts),
                        completions=texts, rows=out_rows, seq_mask=seq_mask, turn_rewards=tr.to(device))


# ----------------------------------------------------------------------------- the engine


class EnvEngine:
    """A rollout engine that plays episodes with the built-in engine's model: ``generate`` ignores the
    rendered prompts and starts each episode from ``env.reset(row, seed)``."""

    name = "env"

    def __init__(self, base, factory, max_turns: int, max_tokens: int):
        self.base, self.factory = base, factory
        self.max_turns, self.max_tokens = max_turns, max_tokens

    def generate(self, prompts, rows, seeds, spec) -> RolloutBatch:
        model, base = self.base.model, self.base
        envs = [self.factory() for _ in range(len(rows) * spec.group_size)]
        was_training = model.training
        model.eval()
        ctx = torch.autocast(base.device.type, dtype=torch.bfloat16) if spec.dtype == "bfloat16" else nullcontext()
        try:
            with ctx, base.unsharded():
                batch = env_rollout(model, base.tokenizer, envs, rows, seeds, spec, max_turns=self.max_turns,
                                    max_tokens=self.max_tokens)
        finally:
            model.train(was_training)
        batch.policy_version = torch.full((len(batch),), base.version, dtype=torch.long)
        return batch

    def update_weights(self, model, version: int) -> None:
        self.base.update_weights(model, version)


def make_env_engine(cfg, algo, base):
    """``base`` wrapped to play the environment named by ``env.name``; refuses what it cannot do
    (``algo``: the resolved algorithm)."""
    if cfg.rollout.engine != "builtin" or cfg.distributed.backend != "torch":
        raise ConfigError("config key 'env.name': environments run with rollout.engine=builtin and "
                          "distributed.backend=torch (see docs/environments.md for what vLLM and Ray need).")
    for key in ("keep_sampling_mask", "keep_routing"):
        if getattr(algo, key):
            raise ConfigError(f"config key 'algo.{key}' is not supported with an environment (env.name).")
    factory = resolve_env(cfg.env.name)
    resettable = bool(getattr(factory(), "resettable", False))
    if not resettable and algo.advantage in GROUP_ESTIMATORS and cfg.group_size > 1:
        msg = (f"environment '{cfg.env.name}' cannot be reset to the same state, so the {cfg.group_size} episodes "
               f"of a group start from different states and the '{algo.advantage}' advantage compares them as if "
               "they did not.")
        if cfg.env.nonresettable_groups == "refuse":
            raise ConfigError(msg + " Use a critic (algorithm=ppo) or a batch baseline (algorithm=reinforce_pp), or "
                              "set env.nonresettable_groups=allow to take the G episodes of one row as the group "
                              "(the baseline then averages over states: unbiased for RLOO, noisier).")
        import warnings

        warnings.warn(msg + " env.nonresettable_groups=allow: the group baseline averages over states.", stacklevel=2)
    return EnvEngine(base, factory, cfg.env.max_turns, cfg.env.max_tokens)
