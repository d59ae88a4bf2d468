"""Keep routing (DeepSeek-V3.2): record the experts a mixture-of-experts model chose while sampling
and force the same experts in the training forward.

An MoE layer's router picks k experts per token. The sampler (KV cache: a prefill forward, then
one forward per new token) and the training forward (one forward over prompt + completion) compute
the router's input with different kernels and shapes, and between rollout and update the weights
move; a token near a routing boundary then goes to different experts, and π_θ / π_old compares two
different networks. Recording the sampler's choices and replaying them in every training forward
(old, ref and current log-probs) makes the ratio compare the same sub-network.

Both tools hook the per-layer router modules of transformers' MoE models (``MixtralTopKRouter``,
``Qwen2MoeTopKRouter``, ``Qwen3MoeTopKRouter``, …), whose forward maps the flat hidden states
``[n_tokens, H]`` to ``(router_logits [n, E], scores [n, k], expert_ids [n, k])``. A forward hook
reads ``expert_ids`` (recording) or replaces ``(scores, expert_ids)`` (replay). The replayed scores
are recomputed from the current router logits at the recorded experts with the router's own rule
(``ROUTER_RULES``), so the router still gets gradients. A router class not in ``ROUTER_RULES`` is
an error that names it; the first replayed call of each router also checks that the rule
reproduces the model's own scores, so a changed upstream router fails loudly instead of silently.

Recording protocol (what the sampler calls; every forward inside the ``with`` is recorded):

=====================================  ====================================================
sampler                                recorder
=====================================  ====================================================
prefill ``model(ids [B, P])``          creates the table: B rows, columns 0..P-1 filled
``cache.batch_repeat_interleave(G)``   ``rec.expand(G)``: row i → rows i·G … i·G+G-1 (N = B·G)
``cache.batch_select_indices(stay)``   ``rec.select(stay)``: the batch now holds the alive
                                       rows ``alive[stay]`` (indices into the current batch,
                                       exactly what the cache got); dropped rows keep their
                                       columns and get -1 from here on
decode ``model(tok [n_alive, 1])``     fills the next column for the alive rows
=====================================  ====================================================

``rec.routing(width)`` then returns, per MoE layer in layer order, a ``[N, width, k]`` tensor of
expert ids (-1 where no forward routed a token: after a row finished, and the last sampled token,
which is never fed back). Column j is position j of ``cat(prompt_ids, completion_ids)`` as the
sampler's rows hold them (left-padded prompt of width P, then the completion), so it lines up with
the training forward's ``input_ids`` without any shifting.
"""

from __future__ import annotations

import torch
from torch import nn

# How each supported router turns logits [n, E] into the weights of its chosen experts [n, k]:
#   "softmax":      softmax over all E experts (float32), take the chosen, renormalize to sum 1 if
#                   the router's ``norm_topk_prob`` is true.
#   "softmax_norm": the same, always renormalized (Mixtral, Qwen3-VL-MoE, Qwen3.5-MoE).
#   "topk_softmax": softmax over the chosen experts' logits only (GPT-OSS).
ROUTER_RULES = {
    "MixtralTopKRouter": "softmax_norm",
    "Qwen2MoeTopKRouter": "softmax",
    "Qwen3MoeTopKRouter": "softmax",
    "Qwen3NextTopKRouter": "softmax",
    "Qwen3VLMoeTextTopKRouter": "softmax_norm",
    "Qwen3_5MoeTopKRouter": "softmax_norm",
    "OlmoeTopKRouter": "softmax",
    "GptOssTopKRouter": "topk_softmax",
}


def _is_router(module: nn.Module) -> bool:
    return "router" in type(module).__name__.lower()


def find_routers(model: nn.Module) -> list[nn.Module]:
    """The per-layer router modules of ``model`` in layer (module registration) order; [] for a
    dense model. A router is a module whose class name contains "Router" (transformers' MoE
    models), or — older and remote-code MoE models — a ``gate``/``router`` submodule next to an
    ``experts`` submodule. Routers nested inside a router are not counted twice."""
    found, seen = [], set()
    for module in model.modules():
        if id(module) in seen:
            continue
        cand = []
        if _is_router(module):
            cand = [module]
        elif hasattr(module, "experts"):
            cand = [getattr(module, n) for n in ("gate", "router")
                    if isinstance(getattr(module, n, None), nn.Module) and not _is_router(getattr(module, n))]
        for r in cand:
            if id(r) not in seen:
                found.append(r)
                for sub in r.modules():
                    seen.add(id(sub))
    return found


def is_moe(model: nn.Module) -> bool:
    """True when ``model`` has mixture-of-experts routers."""
    return len(find_routers(model)) > 0


def _check_supported(routers):
    for r in routers:
        name = type(r).__name__
        if name not in ROUTER_RULES:
            raise NotImplementedError(
                f"keep_routing: router {name} is not supported (supported: {', '.join(sorted(ROUTER_RULES))}). "
                f"Its routing rule must be added to lmpo.models.moe.ROUTER_RULES after checking its forward "
                f"returns (router_logits, scores, expert_ids) and how it computes the scores; or disable keep_routing.")


def expert_scores(router: nn.Module, logits: torch.Tensor, expert_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights [n, k] ``router`` gives the experts ``expert_ids`` [n, k] from ``logits`` [n, E],
    by its rule in ``ROUTER_RULES`` (differentiable in ``logits``)."""
    rule = ROUTER_RULES[type(router).__name__]
    if rule == "topk_softmax":
        return torch.softmax(logits.gather(-1, expert_ids), dim=-1, dtype=logits.dtype).to(dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    top = probs.gather(-1, expert_ids)
    if rule == "softmax_norm" or getattr(router, "norm_topk_prob", False):
        top = top / top.sum(dim=-1, keepdim=True)
    return top.to(dtype)


def _batch_shape(args, kwargs):
    """[rows, seq] of a causal-LM call from its input_ids / inputs_embeds."""
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None and args:
        x = args[0]
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("keep_routing: the model must be called with input_ids [rows, seq] or inputs_embeds "
                         "[rows, seq, H]")
    return int(x.shape[0]), int(x.shape[1])


class _Hooked:
    """Shared machinery: a pre-hook on the model that learns [rows, seq] of each forward, a forward
    hook on every router, and a post-hook that checks every router ran once per forward."""

    _prepend = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.routers = find_routers(model)
        _check_supported(self.routers)
        self._handles = []
        self._shape = None
        self._calls = None
        self._last = {}

    def __enter__(self):
        if self.routers:
            self._handles.append(self.model.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._post, with_kwargs=True))
            for layer, r in enumerate(self.routers):
                self._handles.append(r.register_forward_hook(self._make_hook(layer), prepend=self._prepend))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False

    def _pre(self, module, args, kwargs):
        self._shape = _batch_shape(args, kwargs)
        self._calls = [0] * len(self.routers)

    def _post(self, module, args, kwargs, output):
        if self._calls is not None and any(c != 1 for c in self._calls):
            bad = [type(self.routers[i]).__name__ + f"[{i}]" for i, c in enumerate(self._calls) if c != 1]
            raise RuntimeError(f"keep_routing: routers {bad} were not called exactly once in this forward "
                               f"(calls={self._calls}); a fused MoE kernel that bypasses the router module is not "
                               f"supported by keep_routing")
        self._shape = self._calls = None

    def _tokens(self, layer, ids):
        """(rows, seq, live) of the router call of ``layer``; ``live`` is False for a call outside
        a forward of the model (gradient checkpointing re-running a layer in backward), which
        reuses the shape of that layer's last call."""
        live = self._shape is not None
        if live:
            self._calls[layer] += 1
            self._last[layer] = self._shape
        elif self._last.get(layer) is None:
            raise RuntimeError("keep_routing: a router ran outside a forward of the hooked model "
                               "(call the same module the recorder/replay was given)")
        rows, seq = self._last[layer]
        if ids.dim() != 2 or ids.shape[0] != rows * seq:
            raise RuntimeError(f"keep_routing: router {layer} returned expert ids {tuple(ids.shape)}, expected "
                               f"[{rows}×{seq}, k] (one row per token, batch-major)")
        return rows, seq, live


class RoutingRecorder(_Hooked):
    """Records, for every MoE layer, the experts chosen for every token of the forwards run inside
    the ``with`` (see the module docstring for the protocol with a KV-cache sampler).

    ``dtype``: storage of the table (``torch.long`` by default; ``torch.int16`` holds any model with
    < 32768 experts in a quarter of the memory). ``capacity``: columns allocated up front (the
    table grows by doubling past it). On a dense model everything is a no-op and ``routing()`` is [].
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.long, capacity: int = 0):
        super().__init__(model)
        self.dtype, self.capacity = dtype, capacity
        self.tables: list[torch.Tensor | None] = [None] * len(self.routers)  # [R, C, k] each
        self.alive: torch.Tensor | None = None   # [n_alive] table row of each row of the current batch
        self.col = 0                             # next column to fill
        self._next_col = None

    # --- sampler protocol
    def expand(self, repeats: int) -> None:
        """Each row of the current batch becomes ``repeats`` consecutive rows (call it right after
        ``cache.batch_repeat_interleave(repeats)``, with every row still alive)."""
        if not self.routers or repeats == 1:
            return
        if self.alive is None:
            raise RuntimeError("RoutingRecorder.expand: no forward was recorded yet (expand after the prefill)")
        if self.alive.numel() != self.tables[0].shape[0]:
            raise RuntimeError("RoutingRecorder.expand: rows were dropped already; expand only before select")
        self.tables = [t.repeat_interleave(repeats, 0) for t in self.tables]
        self.alive = torch.arange(self.tables[0].shape[0], device=self.alive.device)

    def select(self, idx: torch.Tensor) -> None:
        """The batch keeps only its rows ``idx`` (indices into the current batch, as given to
        ``cache.batch_select_indices``); the others stop being recorded."""
        if not self.routers:
            return
        if self.alive is None:
            raise RuntimeError("RoutingRecorder.select: no forward was recorded yet")
        self.alive = self.alive[torch.as_tensor(idx, device=self.alive.device).long()]

    def routing(self, width: int | None = None) -> list[torch.Tensor]:
        """Per MoE layer, ``[N, width, k]`` expert ids (-1 where no token was routed). ``width``
        defaults to the columns filled; a larger one pads with -1 (pass ``P + T`` of the batch)."""
        if not self.routers or self.tables[0] is None:
            return []
        width = self.col if width is None else width
        if width < self.col and any((t[:, width:self.col] >= 0).any() for t in self.tables):
            raise ValueError(f"RoutingRecorder.routing: width={width} drops recorded columns (filled: {self.col})")
        out = []
        for t in self.tables:
            t = t[:, :min(width, t.shape[1])]
            if t.shape[1] < width:
                t = torch.cat([t, t.new_full((t.shape[0], width - t.shape[1], t.shape[2]), -1)], 1)
            out.append(t.clone())
        return out

    # --- hooks
    def _pre(self, module, args, kwargs):
        super()._pre(module, args, kwargs)
        rows, seq = self._shape
        if self.alive is None:
            pass
        elif rows != self.alive.numel():
            raise RuntimeError(f"RoutingRecorder: a forward over {rows} rows, but {self.alive.numel()} rows are alive; "
                               f"call rec.expand(G) / rec.select(idx) whenever the KV cache is expanded / filtered")
        self._next_col = self.col + seq

    def _post(self, module, args, kwargs, output):
        super()._post(module, args, kwargs, output)
        self.col = self._next_col

    def _make_hook(self, layer):
        def hook(router, args, output):
            rows, seq, live = self._tokens(layer, output[2])
            if not live:  # a recomputation, already recorded
                return
            ids = output[2].detach().view(rows, seq, -1).to(self.dtype)
            t = self.tables[layer]
            if t is None:  # the first forward (the prefill) creates the table
                t = ids.new_full((rows, max(self.capacity, seq), ids.shape[-1]), -1)
                if self.alive is None:
                    self.alive = torch.arange(rows, device=ids.device)
            need = self.col + seq
            if need > t.shape[1]:
                t = torch.cat([t, t.new_full((t.shape[0], max(need, 2 * t.shape[1]) - t.shape[1], t.shape[2]), -1)], 1)
            t[self.alive, self.col:need] = ids
            self.tables[layer] = t
        return hook


class RoutingReplay(_Hooked):
    """Inside the ``with``, every forward of ``model`` routes token j of row i of layer l to the
    experts ``routing[l][i, j]`` (from ``RoutingRecorder.routing``: a list of ``[N, W, k]`` per MoE
    layer). Tokens whose ids are -1 (and columns past W) keep the model's own choice. The expert
    weights are recomputed from the current router logits at those experts, normalized as the model
    does, so gradients reach the router. The forward must be over the same N rows, in the same
    order, with the same left-padded prompt width as the rollout (``sequence_inputs(batch)``)."""

    _prepend = True  # replace the ids before any other hook (e.g. a recorder) reads them

    def __init__(self, model: nn.Module, routing: list[torch.Tensor] | None):
        super().__init__(model)
        routing = list(routing or [])
        if routing and len(routing) != len(self.routers):
            raise ValueError(f"RoutingReplay: routing has {len(routing)} layers, the model {len(self.routers)} routers")
        if self.routers and not routing:
            raise ValueError("RoutingReplay: the model is MoE but no routing was given (was it recorded?)")
        self.routing = routing
        self._checked = [False] * len(self.routers)

    def _make_hook(self, layer):
        def hook(router, args, output):
            logits, scores, own = output[0], output[1], output[2]
            rows, seq, _ = self._tokens(layer, own)
            rec = self.routing[layer].to(own.device)
            if rec.shape[0] != rows:
                raise RuntimeError(f"RoutingReplay: routing has {rec.shape[0]} rows, the forward {rows}")
            if rec.shape[-1] != own.shape[-1]:
                raise RuntimeError(f"RoutingReplay: routing has k={rec.shape[-1]}, router {layer} k={own.shape[-1]}")
            if rec.shape[1] < seq:
                rec = torch.cat([rec, rec.new_full((rows, seq - rec.shape[1], rec.shape[2]), -1)], 1)
            elif rec.shape[1] > seq:
                if (rec[:, seq:] >= 0).any():
                    raise RuntimeError(f"RoutingReplay: routing covers {rec.shape[1]} positions, the forward {seq}")
                rec = rec[:, :seq]
            rec = rec.reshape(rows * seq, -1).to(own.dtype)
            if not self._checked[layer]:  # the rule must reproduce the model's own weights
                with torch.no_grad():  # (saves nothing for backward: a checkpoint recompute skips it)
                    mine = expert_scores(router, logits, own, scores.dtype)
                if not torch.allclose(mine.float(), scores.float(), rtol=1e-3, atol=1e-5):
                    raise NotImplementedError(f"keep_routing: the rule {ROUTER_RULES[type(router).__name__]!r} does not "
                                              f"reproduce {type(router).__name__}'s expert weights; update ROUTER_RULES")
                self._checked[layer] = True
            ids = torch.where((rec >= 0).all(-1, keepdim=True), rec, own)
            return (logits, expert_scores(router, logits, ids, scores.dtype), ids, *output[3:])
        return hook
