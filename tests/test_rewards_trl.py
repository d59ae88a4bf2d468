"""TRL's own reward functions (``trl.rewards``, TRL 1.16, a test dependency) run unchanged in
``lmpo train`` on a conversational dataset, and lmpo logs the values TRL computes; the calling
convention (keywords, chat forms, trainer_state, log_metric / log_extra, async) in detail."""

from __future__ import annotations

import asyncio
import json
import math
import random

import pytest
from conftest import TINY, read_jsonl, rl_overrides, write_jsonl

from lmpo.cli import main
from lmpo.rewards import RewardError
from lmpo.rewards.combine import CallPolicy, TrainerState, compute_rewards, reward_inputs

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
MAX_NEW = 32

TRL_REWARDS = f'''
from trl.rewards import (accuracy_reward, get_cosine_scaled_reward, get_repetition_penalty_reward,
                         get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward)

cosine = get_cosine_scaled_reward(max_len={MAX_NEW})
repetition = get_repetition_penalty_reward(ngram_size=2)
overlong = get_soft_overlong_punishment(max_completion_len={MAX_NEW}, soft_punish_cache=12)


def record(completions, completion_ids, trainer_state, log_metric, log_extra, **kwargs):
    """Not TRL's: hands the token ids and the trainer state to samples.jsonl, and a metric."""
    log_extra("ids", completion_ids)
    log_extra("state", [[trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch]] * len(completions))
    log_metric("record/n_completions", len(completions))
    return [0.0] * len(completions)
'''
NAMES = ["accuracy_reward", "reasoning_accuracy_reward", "think_format_reward", "cosine", "repetition", "overlong"]


def _chat_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        answer = "\\boxed{%d}" % (a + b)
        rows.append({"prompt": [{"role": "user", "content": f"{a}+{b}"}], "solution": str(a + b),
                     "completion": f"<think>{a}+{b}</think>{answer}" if i % 2 else answer})
    return rows


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The embedded architecture with a small chat template, briefly SFT-warmed (a few seconds) on
    completions such as '<think>3+4</think>\\boxed{7}' so that sampled completions are a mix of right,
    wrong, well-formed and cut-off answers."""
    from transformers import AutoTokenizer

    from lmpo.config import SFTConfig
    from lmpo.models.tiny import build_tiny
    from lmpo.stages.sft import train_sft

    base = build_tiny(tmp_path_factory.mktemp("chat_base"), seed=0, **TINY)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    data = write_jsonl(tmp_path_factory.mktemp("chat_data") / "sft.jsonl", _chat_rows(512, seed=0))
    out = tmp_path_factory.mktemp("chat_sft")
    train_sft(SFTConfig(model=str(base), dataset=str(data), output_dir=str(out), max_steps=40, batch_size=32,
                        learning_rate=2e-2, warmup_steps=5, threads=1, progress=False, seed=0))
    return out


def test_all_six_trl_rewards_run_in_lmpo_train_with_trl_values(chat_model, tmp_path, monkeypatch, capsys):
    from trl.rewards import (accuracy_reward, get_cosine_scaled_reward, get_repetition_penalty_reward,
                             get_soft_overlong_punishment, reasoning_accuracy_reward, think_format_reward)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS)
    rows = [{k: v for k, v in r.items() if k != "completion"} for r in _chat_rows(32, seed=1)]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    steps, n = 3, 16
    funcs = [f"trl_rewards.py:{name}" for name in NAMES] + ["trl_rewards.py:record"]
    argv = ["train", *rl_overrides(chat_model, tmp_path / "out", dataset=tmp_path / "chat.jsonl", reward_funcs=funcs,
                                   max_steps=steps, max_new_tokens=MAX_NEW, log_samples=n, eval_samples=1)]
    code = main(argv)
    assert code == 0, capsys.readouterr().err

    metrics = read_jsonl(tmp_path / "out" / "metrics.jsonl")
    assert len(metrics) == steps
    for row in metrics:
        assert row["reward/invalid"] == 0
        for name in NAMES:
            assert row[f"reward/{name}/failures"] == 0, name
        assert row["record/n_completions"] == n                 # log_metric reached the step's metrics

    trl = {"accuracy_reward": accuracy_reward, "reasoning_accuracy_reward": reasoning_accuracy_reward,
           "think_format_reward": think_format_reward, "cosine": get_cosine_scaled_reward(max_len=MAX_NEW),
           "repetition": get_repetition_penalty_reward(ngram_size=2),
           "overlong": get_soft_overlong_punishment(max_completion_len=MAX_NEW, soft_punish_cache=12)}
    samples = read_jsonl(tmp_path / "out" / "samples.jsonl")
    assert len(samples) == steps * n
    by_prompt = {r["prompt"][0]["content"] + "=": r["solution"] for r in rows}
    seen = {name: set() for name in NAMES}
    for s in samples:
        completions = [[{"role": "assistant", "content": s["completion"]}]]
        solution = [by_prompt[s["prompt"]]]
        assert s["extra"]["solution"] == solution[0]            # accuracy_reward's own log_extra, per sample
        ids = [s["extra"]["ids"]]
        assert s["extra"]["state"] == [s["step"] - 1, steps, pytest.approx((s["step"] - 1) * 4 / 32)]
        for name, f in trl.items():
            want = f(completions=completions, solution=solution, completion_ids=ids)[0]
            assert s["rewards"][name] == pytest.approx(want, abs=1e-9), (name, s)
            seen[name].add(round(want, 6))
        assert s["reward"] == pytest.approx(sum(s["rewards"][k] for k in NAMES))   # weights 1; record gives 0
    # the completions were varied enough that each verifier said both yes and no
    for name in ("accuracy_reward", "reasoning_accuracy_reward", "think_format_reward"):
        assert seen[name] == {0.0, 1.0}, (name, seen[name])
    assert len(seen["cosine"]) > 2 and len(seen["overlong"]) > 1 and len(seen["repetition"]) > 1


def test_chat_and_string_forms():
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "a": 1, "completion": "z"}, {"prompt": "plain", "b": 2}]
    prompts, completions, columns = reward_inputs(rows, ["x", "y"])
    assert prompts == [rows[0]["prompt"], "plain"]
    assert completions == [[{"role": "assistant", "content": "x"}], "y"]
    assert columns == {"a": [1, None], "b": [None, 2]}
    with pytest.raises(RewardError, match="column 'trainer_state'"):
        reward_inputs([{"prompt": "p", "trainer_state": 1}], ["c"])


def test_keywords_as_trl_passes_them():
    got = {}

    def f(prompts, completions, completion_ids, answer, trainer_state, log_metric, log_extra, **kwargs):
        got.update(prompts=prompts, completions=completions, ids=completion_ids, answer=answer, state=trainer_state,
                   kwargs=kwargs)
        log_metric("m", 1.0)
        log_metric("m", 3.0)
        log_extra("why", ["a", "b"])
        return [1.0, 0.0]

    state = TrainerState(global_step=4, max_steps=10, epoch=0.5)
    res = compute_rewards([("f", f)], None, ["p", "q"], ["x", "y"], {"answer": ["1", "2"], "other": [0, 0]},
                          completion_ids=[[5, 2], [6]], trainer_state=state)
    assert got == dict(prompts=["p", "q"], completions=["x", "y"], ids=[[5, 2], [6]], answer=["1", "2"], state=state,
                       kwargs={"other": [0, 0]})
    assert res.rewards == [1.0, 0.0] and res.logged == {"m": 2.0} and res.extra == {"why": ["a", "b"]}


def test_builtins_accept_chat_completions():
    from lmpo.rewards import addition_exact, addition_digit_steps, length_penalty, think_answer_format

    chat = [[{"role": "assistant", "content": "85"}], [{"role": "assistant", "content": "86"}]]
    assert addition_exact(prompts=["p", "p"], completions=chat, answer=["85", "85"]) == [1.0, 0.0]
    fmt = [[{"role": "assistant", "content": "<think>a</think><answer>b</answer>"}]]
    assert think_answer_format(prompts=["p"], completions=fmt) == [1.0]
    assert length_penalty(prompts=["p"], completions=chat[:1], completion_ids=[[1] * 2000]) == [-1.0]
    steps = addition_digit_steps(prompts=["p"], completions=chat[:1], completion_ids=[[1, 2, 3]], answer=["85"])
    assert steps == [{"rewards": [1.0, 1.0, 1.0], "ends": [0, 1, 2]}]
    with pytest.raises(KeyError, match="needs an 'answer' column"):
        addition_exact(prompts=["p"], completions=["85"])


def test_async_functions_are_awaited_together():
    """Both coroutines must be in flight at once: each waits for the other's event."""
    events = {}

    def make(me, other):
        async def f(prompts, completions, **kwargs):
            loop = asyncio.get_running_loop()
            events.setdefault(me, asyncio.Event())
            events.setdefault(other, asyncio.Event())
            events[me].set()
            await asyncio.wait_for(events[other].wait(), timeout=30)
            assert asyncio.get_running_loop() is loop
            return [1.0] * len(completions)
        f.__name__ = me
        return f

    res = compute_rewards([make("a", "b"), make("b", "a")], None, ["p"], ["c"], {}, how=CallPolicy(timeout_s=60))
    assert res.failures == [] and res.rewards == [2.0]


def test_signature_errors_name_the_function_and_the_column():
    def needs_solution(prompts, completions, solution, **kwargs):
        return [1.0] * len(completions)

    def no_kwargs(prompts, completions):
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match=r"'needs_solution' needs the argument 'solution'.*columns are: answer"):
        compute_rewards([("needs_solution", needs_solution)], None, ["p"], ["c"], {"answer": ["1"]})
    with pytest.raises(RewardError, match=r"'no_kwargs' does not accept the keyword 'completion_ids'.*\*\*kwargs"):
        compute_rewards([("no_kwargs", no_kwargs)], None, ["p"], ["c"], {})


def test_timeout_and_sys_exit_are_failures_not_the_end():
    import threading

    release = threading.Event()

    def hangs(prompts, completions, **kwargs):
        release.wait(60)
        return [1.0] * len(completions)

    def exits(prompts, completions, **kwargs):
        raise SystemExit(3)

    def fine(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    try:
        res = compute_rewards([("hangs", hangs), ("exits", exits), ("fine", fine)], None, ["p"] * 2, ["c"] * 2, {},
                              how=CallPolicy(timeout_s=1.0))
    finally:
        release.set()
    assert res.valid == [False, False] and all(math.isnan(r) for r in res.rewards)
    assert "reward_timeout_s=1 s" in res.errors["hangs"]
    assert "sys.exit(3)" in res.errors["exits"]
    assert res.per_func["fine"] == [0.5, 0.5]
    assert set(res.dead()) == {"hangs", "exits"}
    assert compute_rewards([("fine", fine)], None, ["p"], ["c"], {}, how=CallPolicy(timeout_s=5)).rewards == [0.5]  # the next batch


def test_samples_log_is_valid_json_with_nan_rewards(chat_model, tmp_path, monkeypatch):
    """A reward returning NaN for a sample is logged as null in samples.jsonl (strict JSON)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.py").write_text("import math\ndef half(prompts, completions, **kw):\n"
                                   "    return [math.nan if i % 2 else 1.0 for i in range(len(completions))]\n")
    rows = [{k: v for k, v in r.items() if k != "completion"} for r in _chat_rows(8, seed=2)]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    argv = ["train", *rl_overrides(chat_model, tmp_path / "out", dataset=tmp_path / "chat.jsonl",
                                   reward_funcs=["r.py:half"], max_steps=1, log_samples=4, eval_samples=1)]
    with pytest.warns(UserWarning, match="reward failures"):
        assert main(argv) == 0
    lines = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) for line in lines]
    assert [r["rewards"]["half"] for r in rows] == [1.0, None, 1.0, None]
    assert [r["reward"] is None for r in rows] == [False, True, False, True]
