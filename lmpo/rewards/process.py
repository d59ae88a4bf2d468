"""Process supervision (DeepSeekMath §4.1.3): reward sources that score each reasoning step.

A process reward function is marked with ``@process_reward`` and returns, per sample, ``None`` or
``{"rewards": [r_1, …, r_K], "ends": [e_1, …, e_K]}``: one reward per step and the index (into the
completion's tokens, 0-based) of the token where that step ends. It receives the same
keywords as every reward function (TRL's), ``completion_ids`` among them (the sampled token ids of
each completion, EOS included).
The loop normalizes the step rewards over the group and gives each token the sum of the
normalized rewards of the steps ending at or after it (``lmpo.algorithms.process_advantages``).
"""

from __future__ import annotations

from .text import as_text


def process_reward(fn):
    """Mark ``fn`` as a process (step-level) reward source."""
    fn.process_reward = True
    return fn


def is_process_reward(fn) -> bool:
    return bool(getattr(fn, "process_reward", False))


@process_reward
def addition_digit_steps(prompts, completions, completion_ids=None, answer=None, **_columns):
    """The embedded task with one step per written character (the embedded tokenizer has one token
    per character): step i is rewarded 1 when character i matches the answer's, and a last step at
    the EOS token is rewarded 1 when the whole answer is exact. Completions without EOS (truncated)
    get no final step. An error without an ``answer`` column."""
    if answer is None:
        raise KeyError("addition_digit_steps needs an 'answer' column (the gold sum); the dataset has none")
    out = []
    for i, (text, gold) in enumerate(zip(completions, answer)):
        if gold is None:
            out.append(None)
            continue
        text, gold = as_text(text), str(gold).strip()
        n_tokens = len(completion_ids[i]) if completion_ids is not None else len(text) + 1
        rewards = [1.0 if j < len(gold) and ch == gold[j] else 0.0 for j, ch in enumerate(text)]
        ends = list(range(len(text)))
        if n_tokens > len(text):  # the EOS token is there
            rewards.append(1.0 if text == gold else 0.0)
            ends.append(len(text))
        out.append({"rewards": rewards, "ends": ends})
    return out
