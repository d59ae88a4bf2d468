"""SmolLM2-135M: each phase of one GRPO step (the vs_trl ``smollm2`` size) under each of lmpo's speed
settings, on one fixed batch, in CPU seconds of one thread, beside the roofline's floors.

    PYTHONPATH=. python bench/smollm2_phases.py                 # needs `lmpo fetch-model smollm2` (or --model DIR)
    PYTHONPATH=. python bench/smollm2_phases.py --repeats 1 --json bench/results/smollm2_phases.json

Generation: 2 chat prompts x 4 samples, 64 new tokens with the stop tokens disabled (every variant
does the same 64 decoding steps for 8 rows): float32; ``dtype: bfloat16`` (autocast; lmpo's lean
decoding step after HF's prefill), HF's forward under autocast with the eager attention kernel lmpo used
before the lean step, and with torch's SDPA kept; ``rollout.dtype: bfloat16`` (a bf16 copy of the weights). Update: the training forward +
backward of lmpo's GRPO loss on a real batch of that size (completions sampled by the float32 model,
seeded, so their lengths are the model's), padded or ``padding_free``, float32 or bf16 autocast.
Optimizer: clip + AdamW step over all 134.5 M parameters, torch's default or ``fused_adamw``.
CPU time (``time.process_time``) with one thread, so other tenants of a busy machine do not count.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from contextlib import nullcontext

import torch

from lmpo.algorithms import aggregate_loss, policy_loss
from lmpo.data import render_prompt
from lmpo.models.load import fetch_model, load_causal_lm, load_tokenizer
from lmpo.rl.forward import completion_logp
from lmpo.rollout.batch import encode_prompts
from lmpo.rollout.engine import eager_attention
from lmpo.rollout.sampler import SamplingSpec, generate, group_uniforms, rollout

PROMPTS = ["What is 23 + 58? Reply with the number only.", "What is 47 + 36? Reply with the number only."]
G, T = 4, 64


def cpu_s(fn, repeats: int) -> float:
    fn()                                                                                      # warm-up
    t = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - t) / repeats


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    path = a.model or str(fetch_model("smollm2", install=False))
    model, tok = load_causal_lm(path, trainable=True), load_tokenizer(path)
    n = sum(p.numel() for p in model.parameters())
    prompts = [render_prompt([{"role": "user", "content": q}], tok, i) if getattr(tok, "chat_template", None) else q
               for i, q in enumerate(PROMPTS)]
    res: dict = {"params": n, "threads": 1}

    # --- generation: the same 64 decoding steps for 8 rows in every variant
    ids, pm = encode_prompts(tok, prompts, None)
    u = group_uniforms([1, 2], G, T)
    bf16_copy = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
    bf16_copy.set_attn_implementation("eager")

    def gen(m, ctx=nullcontext, attention=nullcontext, dtype="float32"):
        def run():
            with ctx(), attention(m):        # dtype "bfloat16": lmpo's lean decoding step (HF's forward otherwise)
                generate(m.eval(), ids, pm, SamplingSpec(group_size=G, max_new_tokens=T, dtype=dtype), eos_token_id=-1,
                         pad_token_id=tok.pad_token_id, uniforms=u)
        return run

    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)              # noqa: E731
    for name, fn in (("float32", gen(model)),
                     ("dtype=bfloat16 (autocast, lean decoding step)", gen(model, autocast, eager_attention, "bfloat16")),
                     ("autocast, HF's forward with eager attention", gen(model, autocast, eager_attention)),
                     ("dtype=bfloat16 with SDPA kept", gen(model, autocast)),
                     ("rollout.dtype=bfloat16 (bf16 copy, eager)", gen(bf16_copy))):
        res[f"generate/{name}"] = cpu_s(fn, a.repeats)
        print(f"generate  {name:45s} {res[f'generate/{name}']:.2f} CPU s", flush=True)
    del bf16_copy

    # --- update: one real batch (float32 sampling, seeded), GRPO loss, forward + backward
    batch = rollout(model, tok, prompts, [{}, {}], SamplingSpec(group_size=G, max_new_tokens=T), seeds=[1, 2])
    batch.adv = torch.randn(len(batch), 1).expand_as(batch.mask).contiguous()
    lengths = batch.mask.sum(-1).long().tolist()
    res["completion_lengths"] = lengths
    res["prompt_tokens"] = int(batch.prompt_mask[::G].sum())
    model.train()

    def update(ctx, padding_free):
        def run():
            with ctx():
                logp, _, _ = completion_logp(model, batch, 1.0, with_entropy=True, padding_free=padding_free)
            per_tok = policy_loss(logp, logp.detach(), batch.adv, batch.mask, 0.2, 0.2)
            aggregate_loss(per_tok, batch.mask, mode="seq-mean-token-mean", global_tokens=batch.mask.sum(),
                           global_seqs=torch.tensor(len(batch))).backward()
            model.zero_grad(set_to_none=True)
        return run

    for name, fn in (("float32, padded", update(nullcontext, False)),
                     ("float32, padding_free", update(nullcontext, True)),
                     ("bf16 autocast, padded", update(autocast, False)),
                     ("bf16 autocast, padding_free", update(autocast, True))):
        res[f"update/{name}"] = cpu_s(fn, a.repeats)
        print(f"update    {name:45s} {res[f'update/{name}']:.2f} CPU s", flush=True)

    # --- optimizer: clip + AdamW over every parameter
    for p_ in model.parameters():
        p_.grad = torch.randn_like(p_) * 1e-3
    for name, kw in (("torch default (CPU: one tensor at a time)", {}), ("fused_adamw", {"fused": True})):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, **kw)

        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        res[f"optimizer/{name}"] = cpu_s(step, a.repeats)
        print(f"optimizer {name:45s} {res[f'optimizer/{name}']:.2f} CPU s", flush=True)
        del opt
    print(json.dumps(res, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
