"""Where a bf16 decoding step of SmolLM2-135M goes: the lean step's matrix multiplies with the weights as
plain bf16 (``F.linear``) and reordered into oneDNN's blocked layout (what ``lmpo/rollout/lean_decode.py``
does on a CPU with native oneDNN bf16), then the real step with plain weights, with reordered ones and
without its multiplies, and a rollout's fixed costs (HF's prefill, building the decoder's weights).

    PYTHONPATH=. python bench/decode_step.py --threads 2            # needs `lmpo fetch-model smollm2`

Part 1 uses random weights of the model's shapes (the 4 multiplies of each layer with q/k/v and gate/up
fused, and the output layer) at ``--rows`` rows and checks both layouts give the same result bit for bit.
Part 2 decodes ``--steps`` greedy steps for 2 chat prompts × 4 rows. Wall-clock milliseconds, best of
``--repeats`` for part 1; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def shapes(cfg) -> list[tuple[int, int]]:
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    E, I = cfg.hidden_size, cfg.intermediate_size
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * D
    return [(qkv, E), (cfg.num_attention_heads * D, E), (2 * I, E), (E, I)] * cfg.num_hidden_layers + [(cfg.vocab_size, E)]


def ms(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def matmuls(cfg, rows: int, repeats: int) -> None:
    ws = [torch.randn(n, k).bfloat16() for n, k in shapes(cfg)]
    xs = {k: torch.randn(rows, k).bfloat16() for k in {k for _, k in shapes(cfg)}}
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in ws]
    plain = lambda: [F.linear(xs[w.shape[1]], w) for w in ws]                                    # noqa: E731
    reordered = lambda: [torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [], "")   # noqa: E731
                         for w, p in zip(ws, packed)]
    same = all(torch.equal(a, b) for a, b in zip(plain(), reordered()))
    mb = sum(w.numel() for w in ws) * 2 / 1e6
    a, b = min(ms(plain, 10) for _ in range(repeats)), min(ms(reordered, 10) for _ in range(repeats))
    print(f"{len(ws)} multiplies, {rows} rows, {mb:.0f} MB of bf16 weights: F.linear {a:.1f} ms, "
          f"reordered {b:.1f} ms ({b / a:.2f}x), same results bit for bit: {same}")


def real_step(path: str, steps: int) -> None:
    from lmpo.data import render_prompt
    from lmpo.models.load import load_causal_lm, load_tokenizer
    from lmpo.rollout import lean_decode
    from lmpo.rollout.batch import encode_prompts
    from lmpo.rollout.engine import eager_attention
    from lmpo.rollout.sampler import _prefill

    model, tok = load_causal_lm(path, trainable=True), load_tokenizer(path)
    qs = ["What is 23 + 58? Reply with the number only.", "What is 47 + 36? Reply with the number only."]
    ids, pm = encode_prompts(tok, [render_prompt([{"role": "user", "content": q}], tok, i) for i, q in enumerate(qs)], None)
    model.eval()

    def decode(variant: str) -> tuple[float, float, float]:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), eager_attention(model):
            t0 = time.perf_counter()
            cache, logits, attn, pos = _prefill(model, ids, pm, 4, None)
            torch.clear_autocast_cache()
            t1 = time.perf_counter()
            reorder = lean_decode.prepacked
            if variant == "plain bf16 weights":
                lean_decode.prepacked = lambda device, dtype: False
            try:
                lean = lean_decode.LeanDecoder(model, cache, attn, steps + 1)
            finally:
                lean_decode.prepacked = reorder
            t2 = time.perf_counter()
            if variant == "without multiplies":
                lean._linear = lambda x, w, b: x.new_zeros(x.shape[0], w.shape[0])
            nxt = logits.argmax(-1)
            for s in range(steps):
                nxt = lean.step(nxt, pos + s).argmax(-1)
            return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t2) / steps * 1e3

    decode("lean step")
    print(f"8 rows, {steps} steps; this CPU reorders the weights: {lean_decode.prepacked(ids.device, torch.bfloat16)}")
    for variant in ("plain bf16 weights", "lean step", "without multiplies") * 2:
        pre, build, step = decode(variant)
        print(f"{variant:18s}  prefill {pre:6.1f} ms, building the weights {build:6.1f} ms, {step:5.2f} ms per step")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="", help="HF directory (default: lmpo fetch-model smollm2's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from transformers import AutoConfig

    from lmpo.models.load import fetch_model
    path = a.model or str(fetch_model("smollm2", install=False))
    cfg = AutoConfig.from_pretrained(path)
    matmuls(cfg, a.rows, a.repeats)
    real_step(path, a.steps)


if __name__ == "__main__":
    main()
