"""Per-problem HumanEval figures for the SmolLM2 example (docs/real_model.md), and the noise of a
before/after difference.

    # greedy + n sampled completions per problem, graded by code_tests; per-problem counts to a JSON file
    PYTHONPATH=. python bench/smollm2_humaneval_eval.py eval smollm2 examples/smollm2_humaneval/heldout.jsonl \
        --samples 16 --out bench/results/humaneval_base_heldout.json
    # after - before, with a paired bootstrap over problems (95 % interval) and a sign count
    PYTHONPATH=. python bench/smollm2_humaneval_eval.py compare BEFORE.json AFTER.json

``eval`` runs ``lmpo.stages.evaluate.evaluate`` (the same sampler and seeds as ``lmpo eval``) with a
reward function that also records, per problem: the greedy pass, c of n sampled completions passing
(reward >= 1: every test of ``check``), and how many were cut at ``max_new_tokens``. pass@k is
``pass_at_k`` (the unbiased estimator) averaged over problems.

``compare`` reports two 95 % intervals (2.5 / 97.5 % quantiles of the resamples) of the difference
after - before of greedy accuracy and pass@k:

- ``ci95_problems``: the problems resampled with replacement, the same resample for both files (paired).
  The noise of which problems happen to be in a set of this size: does the change carry over to other
  problems like these? Each problem's difference also carries its own sampling noise.
- ``ci95_samples``: the problems fixed, each problem's c redrawn from Binomial(n, c / n) in both files
  (a parametric bootstrap; greedy decoding has no sampling noise and is left out). The noise of drawing
  n samples: is the change real on these problems?
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def run_eval(model_dir, data, samples, max_new_tokens, temperature, seed, rounds=1):
    from lmpo.data import load_rows
    from lmpo.models.load import load_causal_lm, load_tokenizer
    from lmpo.rewards.code_reward import CodeTests
    from lmpo.stages.evaluate import evaluate, pass_at_k, pass_ks

    rows = load_rows(data, what="eval data")
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    grader = CodeTests()
    seen = []                                                       # (reward, length) per sample, in row order

    def reward_fn(prompts, completions, completion_ids=None, **columns):
        rewards = grader(prompts=prompts, completions=completions, **columns)
        seen.extend((r, len(ids)) for r, ids in zip(rewards, completion_ids))
        return rewards

    kw = dict(max_new_tokens=max_new_tokens, seed=seed)
    g = evaluate(model, tok, rows, reward_fn, **kw)
    greedy, seen[:] = list(seen), []
    n = samples * rounds
    sampled = []
    for r in range(rounds):                                         # rounds of `samples`, seeds seed, seed+1, ...
        kw["seed"] = seed + r
        evaluate(model, tok, rows, reward_fn, temperature=temperature, samples=samples, **kw)
        sampled.append(list(seen))
        seen[:] = []
    problems = []
    for i, row in enumerate(rows):
        mine = [x for part in sampled for x in part[i * samples:(i + 1) * samples]]
        problems.append({"task_id": row.get("task_id", str(i)),
                         "greedy": float(greedy[i][0] or 0.0) >= 1.0,
                         "greedy_truncated": greedy[i][1] >= max_new_tokens,
                         "n": n, "c": sum(float(r or 0.0) >= 1.0 for r, _ in mine),
                         "truncated": sum(length >= max_new_tokens for _, length in mine),
                         "mean_length": sum(length for _, length in mine) / n})
    summary = {"greedy_accuracy": sum(p["greedy"] for p in problems) / len(problems),
               "greedy_mean_length": g["mean_length"],
               **{f"pass@{k}": sum(pass_at_k(n, p["c"], k) for p in problems) / len(problems) for k in pass_ks(n)},
               "truncated_frac": sum(p["truncated"] for p in problems) / (n * len(problems)),
               "mean_length": sum(p["mean_length"] for p in problems) / len(problems)}
    return {"model": str(model_dir), "data": str(data), "samples": n, "max_new_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed, "summary": summary, "problems": problems}


def figures(problems, n):
    from lmpo.stages.evaluate import pass_at_k, pass_ks

    out = {"greedy_accuracy": sum(p["greedy"] for p in problems) / len(problems)}
    for k in pass_ks(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, p["c"], k) for p in problems) / len(problems)
    return out


def compare(before, after, reps=10000, seed=0):
    b, a = json.loads(Path(before).read_text()), json.loads(Path(after).read_text())
    ids = [p["task_id"] for p in b["problems"]]
    if ids != [p["task_id"] for p in a["problems"]] or b["samples"] != a["samples"]:
        raise SystemExit("compare: the two files must cover the same problems with the same number of samples")
    n = b["samples"]
    fb, fa = figures(b["problems"], n), figures(a["problems"], n)
    rng = random.Random(seed)
    m = len(ids)
    diffs = {k: [] for k in fb}
    for _ in range(reps):
        pick = [rng.randrange(m) for _ in range(m)]
        xb = figures([b["problems"][i] for i in pick], n)
        xa = figures([a["problems"][i] for i in pick], n)
        for k in fb:
            diffs[k].append(xa[k] - xb[k])
    within = {k: [] for k in fb if k != "greedy_accuracy"}

    def redraw(problems):
        return [{**p, "c": sum(rng.random() < p["c"] / n for _ in range(n))} for p in problems]

    for _ in range(reps // 10):                                     # 1 000: n draws per problem each
        xb, xa = figures(redraw(b["problems"]), n), figures(redraw(a["problems"]), n)
        for k in within:
            within[k].append(xa[k] - xb[k])

    def ci(d):
        d = sorted(d)
        return [d[int(0.025 * len(d))], d[int(0.975 * len(d)) - 1]]

    out = {}
    for k in fb:
        out[k] = {"before": fb[k], "after": fa[k], "diff": fa[k] - fb[k], "ci95_problems": ci(diffs[k])}
        if k in within:
            out[k]["ci95_samples"] = ci(within[k])
    up = sum(pa["c"] > pb["c"] for pa, pb in zip(a["problems"], b["problems"]))
    down = sum(pa["c"] < pb["c"] for pa, pb in zip(a["problems"], b["problems"]))
    out["problems_up_down_same"] = [up, down, m - up - down]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval")
    e.add_argument("model")
    e.add_argument("data")
    e.add_argument("--samples", type=int, default=16)
    e.add_argument("--rounds", type=int, default=1, help="rounds of --samples (seeds seed, seed+1, ...)")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--temperature", type=float, default=0.7)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    a = p.parse_args(argv)
    if a.cmd == "eval":
        import torch

        torch.set_num_threads(a.threads)
        res = run_eval(a.model, a.data, a.samples, a.max_new_tokens, a.temperature, a.seed, a.rounds)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["summary"]))
        print(" ".join(f"{p['task_id'].split('/')[-1]}:{p['c']}/{p['n']}{'g' if p['greedy'] else ''}"
                       for p in res["problems"]))
    else:
        print(json.dumps(compare(a.before, a.after), indent=1))


if __name__ == "__main__":
    main()
