"""This CPU's ceilings and SmolLM2-135M's work per GRPO step, for the roofline in docs/performance.md.

    PYTHONPATH=. python bench/roofline.py                 # needs `lmpo fetch-model smollm2` (or --model DIR)
    PYTHONPATH=. python bench/roofline.py --quick         # fewer repeats

Measures (wall and CPU seconds, so a busy machine shows as CPU < threads × wall):
  * copy bandwidth (a 512 MiB float32 tensor copied: bytes read + written per second);
  * matrix-multiply rate, float32 and bfloat16 (2048³, torch.mm);
  * one decoding step of the real model for 8 rows (KV cache of ~100 positions) with float32 weights and
    with a bfloat16 copy of the weights, and the bytes of weights each step must read;
  * one training forward + backward over the issue's step (2 prompts × 4 samples, 64 new tokens) in
    float32 and under bf16 autocast.
Prints a JSON object; docs/performance.md turns it into the roofline table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def timed(fn, repeats: int) -> dict:
    fn()                                                                                     # warm-up
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return {"wall_s": (time.perf_counter() - w0) / repeats, "cpu_s": (time.process_time() - c0) / repeats}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    r = 3 if a.quick else 10
    res: dict = {"threads": a.threads}

    x = torch.empty(128 * 2**20)                                                              # 512 MiB
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), r)
    res["copy_GBps"] = 2 * x.numel() * 4 / t["wall_s"] / 1e9
    del x, y
    for dt in (torch.float32, torch.bfloat16):
        m = torch.randn(2048, 2048, dtype=dt)
        t = timed(lambda: torch.mm(m, m), r)
        res[f"mm_{str(dt)[6:]}_GFLOPs"] = 2 * 2048**3 / t["wall_s"] / 1e9

    from lmpo.models.load import fetch_model, load_causal_lm

    model = load_causal_lm(a.model or fetch_model("smollm2", install=False), trainable=False)
    n_params = sum(p.numel() for p in model.parameters())
    res["params"] = n_params
    cfg = model.config
    rows, ctx = 8, 100
    ids = torch.randint(0, cfg.vocab_size, (rows, ctx))
    for name, m in (("float32", model), ("bfloat16_weights", copy.deepcopy(model).to(torch.bfloat16))):
        with torch.no_grad():
            out = m(input_ids=ids, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            tok = ids[:, -1:]

            def step():
                m(input_ids=tok, past_key_values=cache, use_cache=True, logits_to_keep=1)
                cache.crop(-1)                                                                # drop the token: the same length each time
            t = timed(step, r)
        res[f"decode_step_{name}"] = t
        res[f"decode_weight_bytes_{name}"] = sum(p.numel() * p.element_size() for p in m.parameters())

    # the training step: 2 prompts x 4 samples, ~45 prompt tokens, 64 new tokens; the prompt once per
    # group (lmpo's shared-prompt forward) is ~2*45 + 8*64 = 602 token positions; here the plain forward
    # over 8 x (45 + 64) positions (what TRL computes), and the tokens each counts.
    model.train().requires_grad_(True)
    seq = torch.randint(0, cfg.vocab_size, (8, 45 + 64))
    for name, ctx_mgr in (("float32", torch.autocast("cpu", enabled=False)),
                          ("bf16_autocast", torch.autocast("cpu", dtype=torch.bfloat16))):
        def fwd_bwd():
            with ctx_mgr:
                logits = model(input_ids=seq, logits_to_keep=65).logits[:, :64].float()
            loss = torch.logsumexp(logits, -1).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        res[f"train_fwd_bwd_{name}"] = timed(fwd_bwd, max(1, r // 3))
    res["train_tokens_full"] = 8 * (45 + 64)
    res["train_tokens_shared_prompt"] = 2 * 45 + 8 * 64
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
