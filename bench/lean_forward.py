"""Does a lean, hand-written forward beat HF's ``LlamaForCausalLM.forward`` at lmpo's sizes? (CPU, one thread)

    PYTHONPATH=. .venv/bin/python bench/lean_forward.py                  # both sizes (~7 min)
    PYTHONPATH=. .venv/bin/python bench/lean_forward.py --sizes small    # ~1 min
    PYTHONPATH=. .venv/bin/python bench/lean_forward.py --seconds 60     # longer per timed row

Two models with identical weights run the same inputs: the stock HF model, and a deepcopy whose
``forward`` (and each decoder layer's) is rebound to ``lean_forward`` below: the same computation
with none of HF's per-call machinery (no 4-D mask builder, rotary module, output capturing, kwargs
plumbing): one boolean SDPA mask per call, rotary cos/sin from ``position_ids``, the linear layers
called as modules, a preallocated KV cache (one slot written per decoded token instead of
``torch.cat`` of the whole cache). Before timing, the lean logits (and parameter gradients) are
checked against HF's. Timings are interleaved A/B in one process (the order alternates every
repetition); medians in ms:

* train fwd+bwd: N prompt + completion rows (left-padded prompts, completions ending early), the
  forward with ``logits_to_keep = T + 1`` as ``lmpo.rl.forward`` calls it, a log-softmax scalar,
  backward (gradients zeroed outside the timing);
* prefill: the B distinct prompts, ``use_cache=True``, ``logits_to_keep=1`` (as the sampler does);
* decode step: one new token for every row against a cache of ``cache`` positions (the cache is
  cropped back outside the timing);
* generate: ``lmpo.rollout.sampler.generate`` end to end (prefill, cache repeated to G rows, greedy,
  no EOS so every row runs ``new`` tokens);
* HF train fwd+bwd, A: full, B: prompt once per group (the HF model in both columns): the same
  loss, with each group's prompt run once (``use_cache=True``, cache ``batch_repeat_interleave(G)``) and only the
  completions run against it; the gradient is the same (checked).

Sizes: ``small`` is the embedded ~1 M Llama (hidden 128, 4 layers, 4 heads, character vocab), 4
prompts x 8 samples = 32 rows, 12 prompt + 8 completion tokens; ``large`` the ~10 M Llama (hidden
320, 6 layers, intermediate 1280), 16 prompts x 16 = 256 rows, 8 prompt + 32 completion tokens.

Measured on the development machine (2 shared AMD EPYC cores with AVX-512, other jobs running;
torch 2.13 CPU, transformers 5.23, 1 thread), ``PYTHONPATH=. .venv/bin/python bench/lean_forward.py``:

    | size          | what                                             | reps |  A: HF | B: lean |  A/B  |
    |---------------|--------------------------------------------------|-----:|-------:|--------:|------:|
    | small (1.1 M) | train fwd+bwd 32x20 (keep 9)                     |  205 |  71.29 |   68.30 | 1.04x |
    | small (1.1 M) | prefill 4x12                                     |  300 |   4.17 |    3.29 | 1.27x |
    | small (1.1 M) | decode step 32 rows, cache 15                    |  300 |   3.80 |    3.29 | 1.16x |
    | small (1.1 M) | generate 4x8, 8 new                              |  300 |  30.74 |   25.87 | 1.19x |
    | large (9.9 M) | train fwd+bwd 256x40 (keep 33)                   |    5 |   8218 |    7595 | 1.08x |
    | large (9.9 M) | prefill 16x8                                     |  300 |  38.69 |   37.04 | 1.04x |
    | large (9.9 M) | decode step 256 rows, cache 24                   |  167 |  89.41 |   84.26 | 1.06x |
    | large (9.9 M) | generate 16x16, 32 new                           |    5 |   2683 |    2590 | 1.04x |

    HF in both columns, A: the full training forward, B: each group's prompt run once:
    | small (1.1 M) | train fwd+bwd 32x(12+8), G=8                     |  278 |  69.55 |   41.98 | 1.66x |
    | large (9.9 M) | train fwd+bwd 256x(8+32), G=16                   |    5 |   7589 |    5979 | 1.27x |

    Other runs: small train 1.01-1.04x, decode 1.12-1.16x, prefill 1.22-1.27x, generate 1.12-1.19x;
    large train 1.02-1.08x, decode 1.06-1.07x (5 repetitions of a 8 s step vary by ~8 % here).
    Lean logits match HF's to < 1e-6 and parameter gradients to < 1e-6 relative (checked every run).

Verdict: the lean forward does not pay (< 1.2x on both the training fwd+bwd and the decode step, at
both sizes), so it is not in lmpo. At these shapes the step is compute-bound, not Python-bound:
profiled, ``aten::mm`` is ~57 % of the lean training step's CPU time and the big element-wise ops
(SiLU gate product and its backward) ~20 %; a fwd+bwd over 32x20 tokens of a 1 M model is ~4 GFLOP.
HF's per-call overhead is ~0.5-1 ms per prefill/decode forward and ~3 ms per training fwd+bwd. What
does pay is computing less: running each group's shared prompt once in the training forward (same
gradient; 1.66x on the small setting, where the prompt is 12 of 20 tokens, 1.27x on the large one).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import types

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SIZES = {
    "small": dict(model=dict(hidden_size=128, num_layers=4, intermediate_size=512),
                  prompts=4, group=8, prompt_len=12, new=8, cache=15),
    "large": dict(model=dict(hidden_size=320, num_layers=6, intermediate_size=1280),
                  prompts=16, group=16, prompt_len=8, new=32, cache=24),
}


# ------------------------------------------------------------------ the lean forward being measured

class LeanCache:
    """Per-layer keys/values [B, H, capacity, D] filled up to ``n``; capacity grows geometrically.
    Updates that carry autograd history are concatenated (never written in place)."""

    def __init__(self):
        self.k, self.v, self.n = [], [], []

    def get_seq_length(self, layer_idx=0):
        return self.n[layer_idx] if layer_idx < len(self.n) else 0

    def update(self, k, v, i):
        if i == len(self.k):
            if k.requires_grad or v.requires_grad:
                kb, vb = k, v
            else:
                B, H, L, D = k.shape
                kb, vb = k.new_empty(B, H, L + max(16, L // 2), D), v.new_empty(B, H, L + max(16, L // 2), D)
                kb[:, :, :L], vb[:, :, :L] = k, v
            self.k.append(kb), self.v.append(vb), self.n.append(k.shape[2])
            return kb[:, :, :k.shape[2]], vb[:, :, :k.shape[2]]
        n0, kb, vb = self.n[i], self.k[i], self.v[i]
        n = n0 + k.shape[2]
        if k.requires_grad or v.requires_grad or kb.requires_grad:
            kb, vb = torch.cat([kb[:, :, :n0], k], 2), torch.cat([vb[:, :, :n0], v], 2)
        else:
            if n > kb.shape[2]:
                cap = max(n, 2 * kb.shape[2])
                kb, vb = (torch.cat([t[:, :, :n0], t.new_empty(*t.shape[:2], cap - n0, t.shape[3])], 2)
                          for t in (kb, vb))
            kb[:, :, n0:n], vb[:, :, n0:n] = k, v
        self.k[i], self.v[i], self.n[i] = kb, vb, n
        return kb[:, :, :n], vb[:, :, :n]

    def batch_repeat_interleave(self, g):
        self.k = [t.repeat_interleave(g, 0) for t in self.k]
        self.v = [t.repeat_interleave(g, 0) for t in self.v]

    def batch_select_indices(self, idx):
        self.k = [t.index_select(0, idx) for t in self.k]
        self.v = [t.index_select(0, idx) for t in self.v]

    def crop(self, length):
        self.n = [min(n, length) if length >= 0 else max(0, n + length) for n in self.n]


class LeanOutput:
    __slots__ = ("logits", "past_key_values", "hidden_states")

    def __init__(self, logits, past_key_values, hidden_states):
        self.logits, self.past_key_values, self.hidden_states = logits, past_key_values, hidden_states


def _rms(x, norm):
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rope(x, cos, sin):
    # [x1, x2] -> [x1 c - x2 s, x2 c + x1 s]; cos = [c, c], sin = [-s, s]
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def _mask(attention_mask, L, past, device):
    """Boolean [B|1, 1, L, past+L]: causal and padding; a query always sees itself (no NaN rows)."""
    Lk = past + L
    if L == 1:
        return None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    kidx, qidx = torch.arange(Lk, device=device), torch.arange(past, Lk, device=device)
    causal = kidx[None, :] <= qidx[:, None]
    if attention_mask is None:
        return causal[None, None]
    return ((causal[None] & attention_mask.bool()[:, None, :]) | (kidx[None, :] == qidx[:, None])[None])[:, None]


def lean_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 use_cache=None, logits_to_keep=0, output_hidden_states=False, **_):
    inner = self.model
    h = inner.embed_tokens(input_ids)
    B, L = input_ids.shape
    cache = past_key_values if past_key_values is not None else (LeanCache() if use_cache else None)
    past = cache.get_seq_length() if cache is not None else 0
    if position_ids is None:
        position_ids = torch.arange(past, past + L, device=h.device)[None]
    mask = _mask(attention_mask, L, past, h.device)
    freqs = position_ids[..., None].float() * inner.rotary_emb.inv_freq.float()
    c, s = freqs.cos(), freqs.sin()
    cos, sin = torch.cat((c, c), -1).to(h.dtype)[:, None], torch.cat((-s, s), -1).to(h.dtype)[:, None]
    hidden = [h] if output_hidden_states else None
    for layer in inner.layers:
        h = layer(h, mask, cos, sin, cache)
        if hidden is not None:
            hidden.append(h)
    h = _rms(h, inner.norm)
    if hidden is not None:
        hidden[-1] = h
    logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h)
    return LeanOutput(logits, cache, tuple(hidden) if hidden is not None else None)


def lean_layer_forward(self, h, mask, cos, sin, cache):
    attn, mlp = self.self_attn, self.mlp
    B, L, _ = h.shape
    D = attn.head_dim
    x = _rms(h, self.input_layernorm)
    q = _rope(attn.q_proj(x).view(B, L, -1, D).transpose(1, 2), cos, sin)
    k = _rope(attn.k_proj(x).view(B, L, -1, D).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(B, L, -1, D).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1])
    h = h + attn.o_proj(o.transpose(1, 2).reshape(B, L, -1))
    x = _rms(h, self.post_attention_layernorm)
    return h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def make_lean(model):
    model.forward = types.MethodType(lean_forward, model)
    for layer in model.model.layers:
        layer.forward = types.MethodType(lean_layer_forward, layer)
    return model


# ------------------------------------------------------------------ the measurements

def _inputs(B, P, T, vocab, seed=0):
    """Token ids [B, P+T] and a mask with left-padded prompts and right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, P + T), generator=g)
    mask = torch.ones(B, P + T, dtype=torch.long)
    for b in range(B):
        mask[b, : b % (P // 2)] = 0                       # prompt padding on the left
        if T:
            mask[b, P + T - b % (T // 2 + 1):] = 0        # completions ending early
    return ids, mask


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _timed(fn, setup=None):
    def run():
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return run


def _check(hf, lean, ids, mask, T):
    """Max |logit difference| at real positions and max relative parameter-gradient difference."""
    pos = _positions(mask)
    outs, grads = [], []
    for m in (hf, lean):
        m.zero_grad(set_to_none=True)
        lg = m(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=T + 1).logits
        (lg.log_softmax(-1)[..., 5] * mask[:, -T - 1:]).sum().backward()
        outs.append(lg.detach())
        grads.append([p.grad.clone() for p in m.parameters()])
    real = mask[:, -T - 1:].bool()
    dl = (outs[0] - outs[1])[real].abs().max().item()
    dg = max(((a - b).norm() / (a.norm() + 1e-30)).item() for a, b in zip(*grads))
    return dl, dg


def bench_size(name, spec, budget_s=30.0, min_reps=5, max_reps=300):
    from lmpo.models.tiny import build_model, build_tokenizer
    from lmpo.rollout.sampler import SamplingSpec, generate

    tok = build_tokenizer()
    hf = build_model(tok, **spec["model"])
    lean = make_lean(copy.deepcopy(hf))
    V = hf.config.vocab_size
    nparams = sum(p.numel() for p in hf.parameters())
    Bp, G, P, T, C = spec["prompts"], spec["group"], spec["prompt_len"], spec["new"], spec["cache"]
    N = Bp * G
    ids, mask = _inputs(N, P, T, V)
    pos = _positions(mask)
    dl, dg = _check(hf, lean, ids[:8], mask[:8], T)
    notes = [f"{name}: lean vs HF, max |logit diff| {dl:.1e}, max relative gradient diff {dg:.1e}"]
    assert dl < 1e-4 and dg < 1e-4, "the lean forward does not compute the HF function"

    def train(model):
        def fn():
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=T + 1)
            out.logits.float().log_softmax(-1)[..., 0].sum().backward()
        return _timed(fn, lambda: model.zero_grad(set_to_none=True))

    pids, pmask = _inputs(Bp, P, 0, V, seed=1)
    ppos = _positions(pmask)

    def prefill(model):
        def fn():
            with torch.no_grad():
                model(input_ids=pids, attention_mask=pmask, position_ids=ppos, use_cache=True, logits_to_keep=1)
        return _timed(fn)

    cids, cmask = _inputs(N, C, 0, V, seed=2)
    cpos = _positions(cmask)
    step_ids = torch.randint(4, V, (N, 1), generator=torch.Generator().manual_seed(3))
    step_mask = torch.cat([cmask, cmask.new_ones(N, 1)], 1)
    step_pos = cpos[:, -1:] + 1

    def decode(model):
        with torch.no_grad():
            cache = model(input_ids=cids, attention_mask=cmask, position_ids=cpos, use_cache=True,
                          logits_to_keep=1).past_key_values

        def setup():
            extra = cache.get_seq_length() - C
            if extra > 0:
                cache.crop(-extra)

        def fn():
            with torch.no_grad():
                model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, past_key_values=cache,
                      use_cache=True, logits_to_keep=1)
        return _timed(fn, setup)

    def rollout(model):
        def fn():
            generate(model, pids, pmask, SamplingSpec(group_size=G, max_new_tokens=T, temperature=0), eos_token_id=-1,
                     pad_token_id=tok.pad_token_id)
        return _timed(fn)

    # the same training loss with every group's prompt run once (HF model in both columns)
    comp = ids[:, P:]
    sh_ids = torch.cat([pids.repeat_interleave(G, 0), comp], 1)
    sh_mask = torch.cat([pmask.repeat_interleave(G, 0), mask[:, P:]], 1)
    sh_pos = _positions(sh_mask)

    def loss_full(model):
        lg = model(input_ids=sh_ids, attention_mask=sh_mask, position_ids=sh_pos, use_cache=False,
                   logits_to_keep=T + 1).logits[:, :T]
        return (lg.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1) * mask[:, P:]).sum()

    def loss_shared(model):
        first = model(input_ids=pids, attention_mask=pmask, position_ids=ppos, use_cache=True, logits_to_keep=1)
        cache = first.past_key_values
        cache.batch_repeat_interleave(G)
        rest = model(input_ids=comp[:, :-1], attention_mask=sh_mask[:, :-1], position_ids=sh_pos[:, P:-1],
                     past_key_values=cache, use_cache=True).logits
        lg = torch.cat([first.logits.repeat_interleave(G, 0), rest], 1)
        return (lg.log_softmax(-1).gather(-1, comp[..., None]).squeeze(-1) * mask[:, P:]).sum()

    grads = []
    for f in (loss_full, loss_shared):
        hf.zero_grad(set_to_none=True)
        f(hf).backward()
        grads.append([p.grad.clone() for p in hf.parameters()])
    dg = max(((a - b).norm() / (a.norm() + 1e-30)).item() for a, b in zip(*grads))
    notes.append(f"{name}: prompt once per group vs full, max relative gradient diff {dg:.1e}")
    assert dg < 1e-4

    def shared_train(f):
        def run(model):
            return _timed(lambda: f(model).backward(), lambda: model.zero_grad(set_to_none=True))
        return run

    rows = [
        (f"train fwd+bwd {N}x{P + T} (keep {T + 1})", train, train, hf, lean),
        (f"prefill {Bp}x{P}", prefill, prefill, hf, lean),
        (f"decode step {N} rows, cache {C}", decode, decode, hf, lean),
        (f"generate {Bp}x{G}, {T} new", rollout, rollout, hf, lean),
        (f"HF train fwd+bwd {N}x({P}+{T}), A: full, B: prompt once per group (G={G})", shared_train(loss_full),
         shared_train(loss_shared), hf, hf),
    ]
    results = []
    for label, make_a, make_b, model_a, model_b in rows:
        a, b = make_a(model_a), make_b(model_b)
        first = a() + b()                                    # warm-up, and the cost of one A/B pair
        n = max(min_reps, min(max_reps, int(budget_s * 1e3 / max(first, 1e-3))))
        ta, tb = [], []
        for r in range(n):
            if r % 2:
                tb.append(b()), ta.append(a())
            else:
                ta.append(a()), tb.append(b())
        results.append((name, label, statistics.median(ta), statistics.median(tb), n))
    return nparams, results, notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--seconds", type=float, default=30.0, help="time budget per timed row (repetitions: 5..300)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}; "
          f"medians in ms, A and B interleaved\n")
    print("| size | what | reps | A: HF | B: lean | A/B |")
    print("|---|---|---:|---:|---:|---:|")
    notes = []
    for name in args.sizes:
        nparams, results, checks = bench_size(name, SIZES[name], args.seconds)
        notes += checks
        for size, label, ta, tb, n in results:
            print(f"| {size} ({nparams / 1e6:.1f} M) | {label} | {n} | {ta:.2f} | {tb:.2f} | {ta / tb:.2f}x |")
            sys.stdout.flush()
    print("\nchecked before timing:\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
