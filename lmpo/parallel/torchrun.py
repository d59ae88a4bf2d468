"""Multi-process training (``distributed.strategy: ddp | fsdp``) under torchrun.

Every hook here is a no-op with one process, so the loop (``rl.py``) reads the same with or without
it. How a step is split across W ranks, and why the result equals the single-process one:

* Prompts. Every rank owns the same seeded prompt stream and takes the same global list of
  ``prompts_per_step`` prompts each step; rank r keeps the contiguous groups
  ``[r*B/W, (r+1)*B/W)`` (``shard``). A group therefore lives on one rank, and its sampling seed is
  its *global* slot, so it draws the same completions as in a single process.
* Advantages. Group-local estimators would be right on a shard, but batch statistics (PPO's
  whitening, ``batch_norm``, REINFORCE++) are not; ``global_rows`` gathers the per-row inputs of the
  estimator from all ranks, computes it on the global batch (the same on every rank) and keeps this
  rank's rows. Exact for every registered estimator, at the cost of an all-gather of [N, T] floats.
* Loss. ``all_sum`` makes a minibatch's token and sequence counts global, so a rank's loss is its
  share of the global loss (``aggregate_loss`` divides by the global counts) and the *sum* over
  ranks of local gradients is the single-process gradient. ``sync_grads`` sums gradients once per
  optimizer step, after micro-batch accumulation. We do not wrap the model in
  ``DistributedDataParallel``: DDP *averages* gradients (we would have to scale the loss by W), and
  the unwrapped model is used everywhere else (sampling, reference via LoRA's disabled adapter,
  ``save_pretrained``). The price: communication is not overlapped with the backward pass.
* FSDP2 (``fsdp``). ``torch.distributed.fsdp.fully_shard`` on every decoder layer and on the root;
  parameters, gradients and AdamW state are sharded. Gradients are reduce-scattered with divide
  factor 1, i.e. summed, for the same reason as above. Sampling and evaluation run with the
  parameters gathered once (``unsharded``), because ranks generate different numbers of tokens and
  a per-forward all-gather would deadlock. The reference model is sharded too.
* Minibatches. With ``minibatches > 1`` each rank splits its own shard (all ranks draw the same
  permutation of local indices); a minibatch is then a different subset of the global batch than in
  one process, but has the same size and the same expectation.
* Logging and checkpoints. Metrics are gathered and combined (means averaged over ranks, losses
  summed, max/min kept, times the slowest rank's); rank 0 writes metrics, checkpoints, the final
  model and the summary. A checkpoint is in the single-process format (full weights via
  ``save_pretrained``, AdamW state keyed like one process's) and the data position is global, so a
  run resumes under any world size.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lmpo.config import check_world
from lmpo.models.load import save_pretrained_as_hf
from lmpo.rollout.batch import cat_padded


@dataclass
class World:
    """This process's place: ``rank`` of ``size`` processes under ``strategy`` (none, ddp, fsdp)."""

    rank: int = 0
    size: int = 1
    strategy: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return self.size > 1

    @property
    def fsdp(self) -> bool:
        """Parameters, gradients and optimizer state are sharded over the ranks."""
        return self.multi and self.strategy == "fsdp"


# ----------------------------------------------------------------------------- start and stop


def launch(argv: list[str], nproc: int) -> int:
    """``lmpo train`` with ``distributed.nproc > 1`` outside torchrun: re-run the same command under
    ``python -m torch.distributed.run --standalone --nproc-per-node N -m lmpo ...``; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lmpo", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    print("lmpo: launching " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=env)


def init(cfg) -> World:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1) and check the config;
    one process otherwise. gloo on CPU, nccl on CUDA (each rank on GPU ``LOCAL_RANK``)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = cfg.distributed.strategy
    if size == 1:
        return World(0, 1, strategy)
    check_world(cfg, size)
    import torch.distributed as dist

    cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), strategy)


def finish(world: World):
    """Wait for every rank (rank 0 may still be writing) and leave the process group."""
    if world.multi:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- models


def _layers(model) -> list[torch.nn.Module]:
    """The decoder layers: modules whose class HF marks as not to be split (``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def prepare_model(model, world: World, trainable: bool = True):
    """ddp: make every rank start from rank 0's weights (broadcast). fsdp: shard every decoder layer and
    the root with ``fully_shard`` (in place: the module keeps its methods, its parameters become
    DTensors, so build the optimizer after this). None or one process: the model as it is."""
    if model is None or not world.multi:
        return model
    import torch.distributed as dist

    if world.strategy == "ddp":
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                dist.broadcast(t.data, src=0)
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (world.size,))
    for layer in _layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if trainable:
        for m in model.modules():                 # per sharded module (the setters do not recurse)
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)   # sum, not average: the loss is already globally normalized
                m.set_force_sum_reduction_for_comms(True)   # plain SUM (gloo has no PREMUL_SUM)
    return model


@contextmanager
def unsharded(model, world: World):
    """fsdp: gather the policy's parameters once for sampling / evaluation (ranks run different
    numbers of forwards there) and shard them again after. A no-op otherwise."""
    if not world.fsdp:
        yield
        return
    model.set_reshard_after_forward(False)
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
        model.set_reshard_after_forward(True)


def sync_grads(optimizers: list, world: World):
    """Sum the gradients of the parameters the ``optimizers`` step (the policy's, a separate critic's)
    over ranks (ddp: all of them; fsdp: FSDP already reduce-scattered the sharded ones). Called once
    per optimizer step, after micro-batch accumulation."""
    if not world.multi:
        return
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
    grads = [p.grad for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    for bucket in _buckets(grads, 2**25):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, v in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(v.view_as(g))


def _buckets(tensors, max_bytes):
    bucket, size = [], 0
    for t in tensors:
        if bucket and (size + t.numel() * t.element_size() > max_bytes or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel() * t.element_size()
    if bucket:
        yield bucket


# ----------------------------------------------------------------------------- data


def shard(w: World, picked: list) -> tuple[int, list]:
    """This rank's contiguous slice of a step's groups and the global index of its first group."""
    if not w.multi:
        return 0, picked
    per = len(picked) // w.size
    return w.rank * per, picked[w.rank * per:(w.rank + 1) * per]


def all_sum(world: World, values: dict) -> dict:
    """Tensors summed over ranks (one all-reduce)."""
    if not world.multi:
        return values
    import torch.distributed as dist

    keys = list(values)
    flat = torch.stack([torch.as_tensor(values[k], dtype=torch.float64) for k in keys])
    dev = values[keys[0]].device if torch.is_tensor(values[keys[0]]) else torch.device("cpu")
    flat = flat.to(dev)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return {k: flat[i].to(values[k].dtype if torch.is_tensor(values[k]) else torch.float64) for i, k in enumerate(keys)}


def global_rows(world: World, fn, **rows):
    """``fn(**rows)`` computed on the global batch: each ``rows`` tensor ([n, ...], this rank's rows;
    None passes through) is gathered from all ranks (padded to the widest), ``fn`` runs on the
    concatenation, and this rank's rows of each output tensor ([N, T] or None) come back, cut to
    this rank's widths. One process: ``fn(**rows)``."""
    if not world.multi:
        return fn(**rows)
    import torch.distributed as dist

    local = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in rows.items()}
    parts: list = [None] * world.size
    dist.all_gather_object(parts, local)
    full = {k: (None if v is None else cat_padded([p[k] for p in parts], k))
            for k, v in local.items()}
    device = rows["mask"].device
    outs = fn(**{k: (v.to(device) if v is not None else None) for k, v in full.items()})
    sizes = [p["mask"].shape[0] for p in parts]
    start, n, width = sum(sizes[: world.rank]), sizes[world.rank], rows["mask"].shape[-1]

    def mine(t):
        if t is None:
            return None
        t = t[start:start + n]
        return t[..., :width] if t.dim() > 1 else t

    return tuple(mine(t) for t in outs) if isinstance(outs, tuple) else mine(outs)


# ----------------------------------------------------------------------------- metrics


def reduce_metrics(world: World, metrics: dict) -> dict:
    """Combine every rank's metrics into one dict, the same on all ranks: losses (each rank holds its
    share of the global loss) and counts are summed, ``*_max`` / ``*_min`` kept, ``time/*`` the
    slowest rank's, everything else averaged (every rank holds the same number of samples)."""
    if not world.multi:
        return metrics
    import torch.distributed as dist

    parts: list = [None] * world.size
    dist.all_gather_object(parts, metrics)
    return combine_metrics(parts)


def combine_metrics(parts: list[dict], weights: list[float] | None = None) -> dict:
    """Metric dicts of several parts (ranks, Ray reward workers, dynamic-sampling rounds) -> one, by
    key: losses and counts (``*loss``, ``*failures``, ``*invalid``) summed, ``*_max`` and ``time/*``
    the largest, ``*_min`` the smallest, the rest averaged, weighted by ``weights`` (default equal):
    sum_i w_i v_i / sum_i w_i. A key missing from a part is 0 there; a non-number is the first's."""
    weights = [1] * len(parts) if weights is None else weights
    out = {}
    for k in {k: None for p in parts for k in p}:
        vals = [p.get(k, 0) for p in parts]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals):
            out[k] = next(p[k] for p in parts if k in p)
        elif k.endswith(("loss", "failures", "invalid")):
            out[k] = sum(vals)
        elif k.endswith("_max") or k.startswith("time/"):
            out[k] = max(vals)
        elif k.endswith("_min"):
            out[k] = min(vals)
        else:
            out[k] = sum(v * w for v, w in zip(vals, weights)) / sum(weights)
    return out


class NullLog:
    """The metrics logger of ranks other than 0."""

    def log(self, *args, **kwargs):
        pass

    def close(self):
        pass


# ----------------------------------------------------------------------------- checkpoints


class _FullWeights:
    """An FSDP model's gathered full state dict, saved like the unsharded model would be."""

    def __init__(self, model, state_dict):
        self.model, self.state_dict = model, state_dict

    def save_pretrained(self, path):
        save_pretrained_as_hf(self.model, path, self.state_dict)


def saveable(world: World, model):
    """What rank 0 can ``save_pretrained``: the model itself, or under fsdp its full weights gathered
    to rank 0's CPU (a collective: every rank calls this)."""
    if model is None or not world.fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    first: dict = {}
    tied = [n for n, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n]
    return _FullWeights(model, {k: v for k, v in sd.items() if k not in tied})   # tied copies: saved once, as HF does


def _param_names(model, optimizer) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model, optimizer, world: World) -> dict:
    """The state of ``model``'s optimizer in the single-process format (ddp: replicated, as it is;
    fsdp: gathered to full tensors on rank 0's CPU and keyed by parameter index; a collective)."""
    if not world.fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    return {"state": {index[n]: s for n, s in full.get("state", {}).items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full.get("param_groups", [])]}


def load_optimizer_state(model, optimizer, world: World, state: dict):
    """Load a single-process-format optimizer state (from any world size); fsdp shards it."""
    if not world.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    full = {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def can_save_alone(world: World) -> bool:
    """Whether rank 0 can write a checkpoint without the other ranks (not under fsdp), e.g. on a crash."""
    return not world.fsdp
