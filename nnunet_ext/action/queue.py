"""FIFO memory queues (ring buffers) stored as module buffers, so they are saved with the trainer's extra modules."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

QUEUE_INITS = ("randn_normalised", "zeros", "fill")


class RingQueue(nn.Module):
    """A FIFO queue of ``size`` rows of shape ``item_shape`` with wrap-around and no divisibility requirement.

    Args:
        size: number of rows kept (``K``).
        item_shape: shape of one row, e.g. ``(D,)`` for embeddings or ``()`` for labels.
        init: ``"randn_normalised"`` (ISD/MoCo: random unit rows, usable as anchors before the first push),
            ``"zeros"`` or ``"fill"`` (every entry ``fill_value``, e.g. label -1 = empty).
        dtype: element type (``torch.long`` for label queues).
        fill_value: value for ``init="fill"``.

    Buffers: ``items`` ``[size, *item_shape]`` in storage order, ``pointer`` (next write position).
    """

    def __init__(self, size: int, item_shape: tuple[int, ...] | int, init: str = "randn_normalised",
                 dtype: torch.dtype = torch.float32, fill_value: float = 0.0):
        super().__init__()
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"queue size must be a positive integer, got {size!r}")
        if init not in QUEUE_INITS:
            raise ValueError(f"unknown queue init {init!r}; expected one of {QUEUE_INITS}")
        item_shape = (item_shape,) if isinstance(item_shape, int) else tuple(item_shape)
        if init == "randn_normalised":
            if not dtype.is_floating_point or len(item_shape) != 1:
                raise ValueError("init='randn_normalised' needs a floating dtype and 1-D items (embeddings)")
            items = F.normalize(torch.randn(size, *item_shape), dim=1).to(dtype)
        elif init == "zeros":
            items = torch.zeros(size, *item_shape, dtype=dtype)
        else:
            items = torch.full((size, *item_shape), fill_value, dtype=dtype)
        self.register_buffer("items", items)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.items.shape[0]

    @torch.no_grad()
    def push(self, rows: torch.Tensor) -> None:
        """Append ``rows`` ``[N, *item_shape]`` (detached) over the oldest; keeps the last ``size`` if N > size."""
        if rows.shape[1:] != self.items.shape[1:]:
            raise ValueError(f"queue rows must have shape [N, {', '.join(map(str, self.items.shape[1:]))}], "
                             f"got {tuple(rows.shape)}")
        rows = rows.detach().to(self.items.dtype)[-self.size:]
        n = rows.shape[0]
        if n == 0:
            return
        positions = (self.pointer + torch.arange(n, device=self.items.device)) % self.size
        self.items[positions] = rows
        self.pointer.copy_((self.pointer + n) % self.size)

    def get(self) -> torch.Tensor:
        """A copy of the rows, oldest first ``[size, *item_shape]`` (safe to use while pushing afterwards)."""
        return torch.roll(self.items, shifts=-int(self.pointer), dims=0).clone()
