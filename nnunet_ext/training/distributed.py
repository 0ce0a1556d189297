"""Collective primitives for multi-GPU (DDP) training of the nnunet-ext trainers (issue 8).

nnU-Net wraps only ``self.network`` in ``DistributedDataParallel``; everything else a method keeps (EMA teachers,
embedding queues, memory banks, prototypes) must be synchronised by the trainer itself. These functions are the
building blocks; ``docs/ddp.md`` says which trainer calls which one at which hook.

Conventions:

* Every exchange function (all but ``is_distributed``, ``world_size``, ``rank``, ``split_batch_size``) is a
  collective when a process group with more than one rank is initialised: **every rank must call it, in the same
  order** (a rank that skips a call deadlocks the others). Without a process group, or with
  world size 1, every function is the identity (or the trivial answer), so single-process training pays nothing.
* Results are in rank order: rank 0's entries first, then rank 1's, ... Every rank receives the same result.
* Tensors are exchanged on their own device: with the NCCL backend (nnU-Net's) they must be CUDA tensors of the
  rank's device, with ``gloo`` (CPU tests) CPU tensors. Nothing here calls ``.cuda()``.
* Only :func:`all_gather_with_grad` takes part in autograd; the others are meant for state updated under
  ``torch.no_grad()`` (queues, memory banks, teachers, statistics).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nnunet_ext.compat import unwrap

#: Elements per all-reduce bucket of :func:`average_gradients_` (64 MiB of float32), bounding the extra memory.
GRADIENT_BUCKET_NUMEL = 2 ** 24

#: Largest tensor rank the size exchange of :func:`all_gather_concat` supports (5D volumes batched = 5 dims).
MAX_GATHER_DIMS = 8

# dtype codes exchanged with the shapes so that a dtype mismatch between ranks is a clear error, not garbage.
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool)


def is_distributed() -> bool:
    """True if ``torch.distributed`` is available and a process group is initialised (any world size)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks of the default process group; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default process group; 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def broadcast_seed() -> int:
    """A random seed drawn on rank 0 and returned on every rank (for generators of shared random draws, R8 of
    ``docs/ddp.md``). Draws from torch's global RNG; a collective under DDP."""
    return int(all_gather_objects([int(torch.randint(0, 2 ** 62, (1,)).item())])[0])


def split_batch_size(global_batch_size: int, num_ranks: int | None = None, rank_index: int | None = None) -> int:
    """This rank's share of a global batch, split as nnU-Net splits the labeled batch across DDP workers.

    The first ``global_batch_size % num_ranks`` ranks get one sample more. Use it for batches nnU-Net does not
    split itself (e.g. an explicit ``unlabeled_batch_size``) so that labeled and unlabeled shares match per rank.

    Args:
        global_batch_size: samples per step over all ranks.
        num_ranks, rank_index: default the current process group's (1 and 0 without one).

    Raises:
        ValueError: fewer samples than ranks (a rank would get an empty batch) or a rank outside the group.
    """
    num_ranks = world_size() if num_ranks is None else num_ranks
    rank_index = rank() if rank_index is None else rank_index
    if num_ranks < 1 or not 0 <= rank_index < num_ranks:
        raise ValueError(f"rank {rank_index} is not in a group of {num_ranks} rank(s)")
    if global_batch_size < num_ranks:
        raise ValueError(f"a global batch of {global_batch_size} sample(s) cannot be split over {num_ranks} ranks "
                         f"(every rank needs at least one sample)")
    return global_batch_size // num_ranks + int(rank_index < global_batch_size % num_ranks)


def _active() -> bool:
    return is_distributed() and dist.get_world_size() > 1


def _gather_shapes(tensor: torch.Tensor, needs_grad: bool = False) -> list[tuple[int, ...]]:
    """Every rank's shape of ``tensor`` (rank order), after checking that all ranks agree on ndim, trailing dims,
    dtype and ``needs_grad``. Every rank sees the same metadata, so every rank raises the same error (no rank is
    left waiting in a later collective)."""
    if tensor.dim() == 0:
        raise ValueError("expected a tensor with a first (batch/entry) dimension, got a 0-d tensor")
    if tensor.dim() > MAX_GATHER_DIMS:
        raise ValueError(f"tensors with more than {MAX_GATHER_DIMS} dimensions are not supported, got "
                         f"shape {tuple(tensor.shape)}")
    dtype_code = _DTYPES.index(tensor.dtype) if tensor.dtype in _DTYPES else -1
    meta = torch.full((MAX_GATHER_DIMS + 3,), -1, dtype=torch.int64, device=tensor.device)
    meta[-1] = int(needs_grad)
    meta[0] = dtype_code
    meta[1] = tensor.dim()
    meta[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    metas = [torch.empty_like(meta) for _ in range(dist.get_world_size())]
    dist.all_gather(metas, meta)
    metas = [m.cpu().tolist() for m in metas]
    shapes = [tuple(m[2:2 + m[1]]) for m in metas]
    if any(m[0] != metas[0][0] for m in metas) or metas[0][0] == -1:
        names = [str(_DTYPES[m[0]]) if m[0] >= 0 else "unsupported" for m in metas]
        raise ValueError(f"all ranks must gather tensors of one supported dtype, got {names} (rank order)")
    if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
        raise ValueError(f"all ranks must gather tensors that differ only in the first dimension, got shapes "
                         f"{shapes} (rank order)")
    if any(m[-1] != metas[0][-1] for m in metas):
        raise ValueError(f"all_gather_with_grad: the input requires grad on some ranks only "
                         f"{[bool(m[-1]) for m in metas]} (rank order); backward would wait forever on the others")
    return shapes


def _padded_all_gather(tensor: torch.Tensor, needs_grad: bool = False) -> tuple[torch.Tensor, list[int]]:
    """Concatenation of every rank's ``tensor`` along dim 0 (rank order) and the per-rank sizes; no autograd."""
    shapes = _gather_shapes(tensor, needs_grad)
    sizes = [s[0] for s in shapes]
    longest = max(sizes)
    local = tensor.detach().contiguous()
    if local.shape[0] < longest:
        # all_gather needs equal shapes: pad to the longest rank, cut the padding after the exchange
        padding = local.new_zeros((longest - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, padding], dim=0)
    gathered = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(gathered, local)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0), sizes


@torch.no_grad()
def all_gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along the first dimension, in rank order; autograd-free.

    For state that must hold the same entries on every rank: ACTION's embedding queues, CAML's memory bank,
    statistics. The first dimension may differ between ranks (also 0: a rank without entries this step); the
    other dimensions and the dtype must agree (ValueError on every rank otherwise).

    Args:
        tensor: ``[N_r, *F]`` on rank ``r``.

    Returns:
        ``[sum_r N_r, *F]``, rows of rank 0 first; the same tensor on every rank, detached. Without a process
        group (or world size 1): ``tensor.detach()``.
    """
    if not _active():
        return tensor.detach()
    return _padded_all_gather(tensor)[0]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own slice (the "GatherLayer")."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        gathered, sizes = _padded_all_gather(tensor, needs_grad=ctx.needs_input_grad[0])
        start = sum(sizes[:dist.get_rank()])
        ctx.local_slice = (start, start + sizes[dist.get_rank()])
        return gathered

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        # every rank's loss may depend on this rank's rows: sum the gradients of all ranks, keep the local slice
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start, stop = ctx.local_slice
        return grad[start:stop]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along the first dimension (rank order), differentiably.

    For quantities computed from all ranks' features, e.g. CFCML's class prototypes. The other ranks' rows are
    constants on this rank; the gradient reaching this rank's own rows is the **sum over ranks** of each rank's
    loss gradient with respect to them (one ``all_reduce`` in backward, so every rank must run backward through
    the call, which DDP requires anyway). DDP then averages parameter gradients over ranks, so a trainer whose
    per-rank loss is ``L_r`` gets the gradient of ``mean_r L_r`` computed by one process on the concatenated
    batch; if every rank computes the same global loss ``L``, the result is the gradient of ``L``. The input
    must require grad on all ranks or on none (ValueError on every rank otherwise), and every rank's loss must
    depend on the result when any does.

    Args:
        tensor: ``[N_r, *F]`` on rank ``r``; ``N_r`` may differ between ranks and may be 0.

    Returns:
        ``[sum_r N_r, *F]``, rank 0's rows first, the same values on every rank. Without a process group (or
        world size 1): ``tensor`` itself (gradient unchanged).
    """
    if not _active():
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: ``tensor`` becomes the element-wise sum of every rank's ``tensor`` (same shape everywhere).

    Autograd-free (pass ``x.detach()`` or a buffer). Returns ``tensor`` for chaining. Identity without a group.
    """
    if _active():
        _check_reducible(tensor)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In place: ``tensor`` becomes the element-wise mean over ranks (floating point only; e.g. statistics or a
    logged loss component). Returns ``tensor``. Identity without a group."""
    if not tensor.is_floating_point():
        raise ValueError(f"all_reduce_mean_ needs a floating point tensor, got {tensor.dtype} (use all_reduce_sum_)")
    if _active():
        _check_reducible(tensor)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def _check_reducible(tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError("in-place all-reduce needs a contiguous tensor (reduce a .contiguous() copy instead)")


@torch.no_grad()
def average_gradients_(parameters: Iterable[nn.Parameter], bucket_numel: int = GRADIENT_BUCKET_NUMEL) -> None:
    """In place: every parameter's ``.grad`` becomes the mean over ranks, as DDP would average it.

    For trainers whose training forward does not go through the DDP wrapper (feature taps on the unwrapped
    network, extra heads and peer models outside DDP): call it after ``backward`` and **before**
    ``GradScaler.unscale_``/clipping/``step``, with the same parameter list in the same order on every rank
    (e.g. every parameter of the optimiser). A rank on which a parameter got no gradient (a head skipped in this
    step) contributes zeros; a parameter without a gradient on every rank keeps ``grad = None`` (so SGD/Adam skip
    it exactly as without DDP). No "unused parameters" error can arise: DDP's reducer is not involved. With mixed
    precision every rank sees the same averaged (possibly non-finite) gradients, so the GradScalers of all ranks
    skip the same steps and keep the same scale.

    Args:
        parameters: the parameters to synchronise (order defines the exchange; must match on every rank).
        bucket_numel: elements per all-reduce call (bounds the temporary flat buffer).

    Raises:
        ValueError: sparse gradients, ``bucket_numel < 1``, or ranks passing different numbers of parameters.
    """
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    params = list(parameters)
    if any(p.grad is not None and p.grad.is_sparse for p in params):
        raise ValueError("average_gradients_ does not support sparse gradients")
    if not _active() or not params:
        return
    device = params[0].device
    counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([len(params)], dtype=torch.int64, device=device))
    counts = [int(c.item()) for c in counts]
    if len(set(counts)) != 1:
        raise ValueError(f"average_gradients_: ranks passed different numbers of parameters {counts} (rank order)")
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    synced = [p for p, flag in zip(params, has_grad.tolist()) if flag]
    for p in synced:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # one flat buffer per (device, dtype) bucket: few large all-reduces instead of one per parameter
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    for p in synced:
        groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for group in groups.values():
        bucket: list[nn.Parameter] = []
        filled = 0
        for p in group:
            if bucket and filled + p.grad.numel() > bucket_numel:
                _average_bucket(bucket)
                bucket, filled = [], 0
            bucket.append(p)
            filled += p.grad.numel()
        _average_bucket(bucket)


def _average_bucket(bucket: list[nn.Parameter]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(dist.get_world_size())
    offset = 0
    for p in bucket:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0) -> nn.Module:
    """In place: copy rank ``src``'s parameters and buffers into ``module`` on every rank.

    Makes state outside the DDP-wrapped network identical at the start of training and after ``--c`` (teachers,
    heads built with rank-dependent randomness, BatchNorm statistics of a teacher). DDP and ``torch.compile``
    wrappers are stripped. All ranks must hold modules with the same parameter and buffer names and shapes
    (ValueError naming the first difference on every rank otherwise). Returns ``module``. Identity without a
    group.
    """
    if not _active():
        return module
    if not 0 <= src < dist.get_world_size():
        raise ValueError(f"src must be a rank in [0, {dist.get_world_size()}), got {src}")
    plain = unwrap(module)
    # named_buffers also lists non-persistent buffers, which state_dict() leaves out
    tensors = list(plain.named_parameters()) + list(plain.named_buffers())
    signature = [(name, tuple(t.shape), str(t.dtype)) for name, t in tensors]
    signatures = all_gather_objects([signature])
    for other_rank, other in enumerate(signatures):
        if other != signature:
            difference = next(((a, b) for a, b in zip(signature, other) if a != b), (len(signature), len(other)))
            raise ValueError(f"broadcast_module_: rank {rank()} and rank {other_rank} hold different modules "
                             f"(first difference: {difference[0]} vs {difference[1]})")
    for _, t in tensors:
        data = t.data
        if data.is_contiguous():
            dist.broadcast(data, src=src)
        else:
            buffer = data.contiguous()
            dist.broadcast(buffer, src=src)
            data.copy_(buffer)
    return module


@torch.no_grad()
def average_batchnorm_statistics_(module: nn.Module) -> nn.Module:
    """In place: the running mean/variance of every BatchNorm layer in ``module`` become their mean over ranks, and
    ``num_batches_tracked`` the largest count of any rank (R7 of ``docs/ddp.md``).

    For extra modules with BatchNorm outside the DDP-wrapped network (CAML's heads): their forwards run only on
    ranks that have rows to project, so ``SyncBatchNorm`` (a collective in forward) cannot be used; averaging the
    statistics after every step keeps them identical on all ranks. All ranks must pass modules of the same
    structure. Returns ``module``. Identity without a group.
    """
    if not _active():
        return module
    for layer in unwrap(module).modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
            all_reduce_mean_(layer.running_mean)
            all_reduce_mean_(layer.running_var)
            counts = all_gather_concat(layer.num_batches_tracked.view(1))
            layer.num_batches_tracked.copy_(counts.max())
    return module


def all_gather_objects(objects: list[Any]) -> list[Any]:
    """Concatenate every rank's list of picklable objects, in rank order (e.g. CAML's memory-bank case ids).

    Args:
        objects: this rank's list (may be empty).

    Returns:
        rank 0's objects, then rank 1's, ...; the same list on every rank. Without a group: a copy of ``objects``.
    """
    if not isinstance(objects, list):
        raise TypeError(f"all_gather_objects takes a list, got {type(objects).__name__}")
    if not _active():
        return list(objects)
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, objects)
    return [item for rank_objects in per_rank for item in rank_objects]
