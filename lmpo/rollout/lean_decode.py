"""A lean decoding step for Llama-family models generating in bfloat16 (``dtype: bfloat16``).

At 1–8 rows per decoding step the matrix multiplies of SmolLM2-135M are only about 60 % of HF's forward
under bf16 autocast on a CPU; the rest is ~60 small operations per layer (autocast casts of every
linear's input, the cache's growing ``torch.cat``, ``repeat_kv`` copies of k and v for grouped-query
attention, ``rotate_half``'s slices and cat) and Python around them. This step computes the same thing
with about half the operations:

- q, k, v as one matrix multiply and gate, up as another (bfloat16 copies of the weights concatenated
  once per rollout: autocast casts the weights once per rollout too, so the memory is the same);
- on a CPU with oneDNN bf16 support, those copies reordered once per rollout into oneDNN's blocked layout
  (``torch.ops.mkldnn._reorder_linear_weight``) and multiplied with ``_linear_pointwise``: with plain bf16
  weights ``F.linear`` hands oneDNN a row-major weight at every call, which its kernels pack first (our
  reading; not traced inside oneDNN), and a step's multiplies at 1–8 rows took 1.4–2× as long
  (SmolLM2-135M, 8 rows, two threads: ``bench/decode_step.py``); the results are the same bit for bit
  (``tests/test_lean_decode.py``); elsewhere ``F.linear`` on the plain copies;
- a KV cache ``[n, kv heads, capacity, d]`` written in place at each step and grown 64 positions at a time;
  attention reads the whole buffer, its unwritten positions masked (weight exactly 0): a prefix slice of
  it is not contiguous, and torch's batched bf16 multiply copied it, K and V, in every layer at every step
  (~2/3 of the attention's time at SmolLM2's size);
- grouped-query attention by viewing the queries as ``[n, kv heads, heads / kv heads, d]``, no copies;
- rotary embeddings as ``x·cos + roll(x, d/2)·sin±`` with ``sin± = [−sin₁, sin₂]`` (= rotate_half(x)·sin).

The arithmetic is that of HF's forward under bf16 autocast: residual stream, RMSNorm (x / √(mean x² + ε)
· w), rotary embeddings and the softmax in float32; the matrix multiplies in bfloat16 with float32
accumulation. It differs from it by bf16 rounding order only (tests/test_lean_decode.py). Models whose
layers are not plain Llama blocks (sliding windows, q/k norms, MoE, LoRA / DDP / FSDP wrappers) keep HF's
forward.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}


def supports(model) -> bool:
    """A plain (unwrapped, unsharded) Llama / Mistral / Qwen2 causal LM with full attention and SiLU MLPs."""
    cfg = getattr(model, "config", None)
    if type(model).__name__ not in SUPPORTED or cfg is None or getattr(cfg, "hidden_act", None) != "silu":
        return False
    if not hasattr(F, "rms_norm"):                          # torch < 2.4: HF's forward
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    return not any(hasattr(p, "full_tensor") for p in model.parameters())


def _cat(tensors, dtype):
    return None if tensors[0] is None else torch.cat([t.detach().to(dtype) for t in tensors])


def prepacked(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the weights go to oneDNN pre-reordered: bf16 on a CPU whose oneDNN runs bf16 matmuls natively
    and whose torch build reorders a probe weight to the same products as ``F.linear``."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _reorder_works()


@functools.cache
def _reorder_works() -> bool:
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(40, 24, generator=g).bfloat16(), torch.randn(40, generator=g).bfloat16()
        x = torch.randn(3, 24, generator=g).bfloat16()
        got = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), b, "none", [], "")
        return torch.equal(got, F.linear(x, w, b))
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):    # an older torch, a build without the ops
        return False


def _rms(x, norm):
    """An HF RMSNorm of float32 ``x``: w · x / √(mean x² + ε), one fused op."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


class LeanDecoder:
    """Decoding steps for the N rows a prefill left in HF's ``cache`` (keys and values [N, kv heads, P, d])
    with attention mask ``attn`` [N, P]; room for ``max_new`` more tokens. ``step`` gives the next logits,
    ``select`` keeps the rows that are still generating."""

    def __init__(self, model, cache, attn: torch.Tensor, max_new: int, dtype=torch.bfloat16):
        cfg, inner = model.config, model.model
        self.dtype, self.inner = dtype, inner
        self.packed = prepacked(attn.device, dtype)
        pack = (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None)) if self.packed else (lambda w: w)
        self.H, self.Hk = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.H
        self.I = cfg.intermediate_size
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(dict(
                n1=layer.input_layernorm, n2=layer.post_attention_layernorm, scale=a.scaling,
                qkv=pack(_cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dtype)),
                qkv_b=_cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], dtype),
                o=pack(a.o_proj.weight.detach().to(dtype)), o_b=_cat([a.o_proj.bias], dtype),
                gu=pack(_cat([m.gate_proj.weight, m.up_proj.weight], dtype)),
                gu_b=_cat([m.gate_proj.bias, m.up_proj.bias], dtype),
                down=pack(m.down_proj.weight.detach().to(dtype)), down_b=_cat([m.down_proj.bias], dtype)))
        head = model.get_output_embeddings()
        self.lm = pack(head.weight.detach().to(dtype))
        self.lm_b = _cat([head.bias], dtype) if getattr(head, "bias", None) is not None else None
        N, P = attn.shape
        self.t, self.limit = P, P + max_new                                         # filled cache positions, room
        self.K = [layer.keys.to(dtype) for layer in cache.layers]                   # [N, Hk, P, d], grown in step
        self.V = [layer.values.to(dtype) for layer in cache.layers]
        self.mask = torch.zeros(N, 1, 1, P, device=attn.device)                    # additive, float32
        self.mask[:, 0, 0].masked_fill_(attn == 0, torch.finfo(torch.float32).min)
        dev = attn.device
        half = self.D // 2
        self.sign = torch.cat([-torch.ones(half, device=dev), torch.ones(self.D - half, device=dev)])

    GROW = 64

    def _grow(self):
        """Room for ``GROW`` more positions (up to the limit): zeros in the cache, masked until written."""
        n, hk, cap, d = self.K[0].shape
        more = max(min(cap + self.GROW, self.limit), self.t + 1) - cap
        self.K = [torch.cat([k, k.new_zeros(n, hk, more, d)], 2) for k in self.K]
        self.V = [torch.cat([v, v.new_zeros(n, hk, more, d)], 2) for v in self.V]
        self.mask = torch.cat([self.mask, self.mask.new_full((n, 1, 1, more), torch.finfo(torch.float32).min)], 3)

    def select(self, rows: torch.Tensor):
        self.K = [k[rows] for k in self.K]
        self.V = [v[rows] for v in self.V]
        self.mask = self.mask[rows]

    @torch.no_grad()
    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """The next token's logits [n, V] in float32 after the tokens ``tok`` [n] at positions ``pos`` [n]."""
        with torch.autocast(tok.device.type, enabled=False):
            x = self.inner.embed_tokens(tok).float()                                # [n, E] residual stream
            cos, sin = self.inner.rotary_emb(x[:, None], pos[:, None])
            cos, sin = cos[:, 0, None].float(), (sin[:, 0] * self.sign)[:, None].float()    # [n, 1, d]
            if self.t == self.K[0].shape[2]:
                self._grow()
            self.mask[..., self.t] = 0.0                                            # every row writes position t
            for i, w in enumerate(self.layers):
                x = self._layer(x, w, self.K[i], self.V[i], cos, sin)
            self.t += 1
            h = _rms(x, self.inner.norm)
            return self._linear(h.to(self.dtype), self.lm, self.lm_b).float()

    def _linear(self, x, w, b):
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)

    def _layer(self, x, w, K, V, cos, sin):
        n, H, Hk, D, t = x.shape[0], self.H, self.Hk, self.D, self.t
        qkv = self._linear(_rms(x, w["n1"]).to(self.dtype), w["qkv"], w["qkv_b"])
        qk = qkv[:, :(H + Hk) * D].view(n, H + Hk, D).float()
        qk = qk * cos + qk.roll(D // 2, -1) * sin                                    # rotary, float32
        K[:, :, t] = qk[:, H:]
        V[:, :, t] = qkv[:, (H + Hk) * D:].view(n, Hk, D)
        q = qk[:, :H].to(self.dtype).view(n, Hk, H // Hk, D)
        scores = torch.matmul(q, K.transpose(-1, -2)).float() * w["scale"] + self.mask      # [n, Hk, H/Hk, capacity]
        att = torch.matmul(scores.softmax(-1).to(self.dtype), V)                     # [n, Hk, H/Hk, d]
        x = x + self._linear(att.reshape(n, H * D), w["o"], w["o_b"])
        gu = self._linear(_rms(x, w["n2"]).to(self.dtype), w["gu"], w["gu_b"])
        return x + self._linear(F.silu(gu[:, :self.I]) * gu[:, self.I:], w["down"], w["down_b"])
