"""Bucketed weight transfer: group tensors into flat byte buffers of bounded size, and split them back.

Both ends of a push (trainer and inference server) plan the buckets from the same metadata, so only the raw bytes
travel: one collective per bucket instead of one per tensor, and never more than one bucket of extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 64 << 20
ALIGN = 16  # every tensor starts at a multiple of this in its bucket, so it can be viewed in place as any dtype


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @property
    def padded_nbytes(self) -> int:
        return -(-self.nbytes // ALIGN) * ALIGN


def tensor_meta(name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> TensorMeta:
    """The tensor's name and shape, with its own dtype or the ``dtype`` it will be cast to before it is sent."""
    return TensorMeta(name, str(dtype or tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[TensorMeta]]:
    """Consecutive runs of tensors whose total size stays within ``bucket_bytes``; a tensor larger than the limit
    gets a bucket of its own. Order is kept, so both sides agree without exchanging the plan."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    buckets: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    size = 0
    for meta in metas:
        if current and size + meta.padded_nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(meta)
        size += meta.padded_nbytes
    if current:
        buckets.append(current)
    return buckets


def pack_bucket(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes in one uint8 buffer (CPU), each at an ``ALIGN``-byte boundary (zero padding between)."""
    parts = []
    for tensor in tensors:
        raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        parts += [raw, torch.zeros(-raw.numel() % ALIGN, dtype=torch.uint8)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack_bucket(buffer: torch.Tensor, metas: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views into ``buffer`` with each tensor's dtype and shape (no copy)."""
    expected = bucket_nbytes(metas)
    if buffer.numel() != expected:
        raise ValueError(f"bucket holds {buffer.numel()} bytes but its tensors need {expected}")
    out, offset = [], 0
    for meta in metas:
        chunk = buffer[offset : offset + meta.nbytes]
        out.append((meta.name, chunk.view(getattr(torch, meta.dtype)).reshape(meta.shape)))
        offset += meta.padded_nbytes
    return out


def bucket_nbytes(metas: list[TensorMeta]) -> int:
    """Size of a bucket's buffer, padding included."""
    return sum(meta.padded_nbytes for meta in metas)
