"""Bucketed weight transfer: group tensors into flat byte buffers of bounded size, and split them back.

Both ends of a push (trainer and inference server) plan the buckets by the same rule (`opens_bucket`), so only the raw
bytes travel: one collective per bucket instead of one per tensor. The trainer builds them lazily (`stream_buckets`):
a push holds one bucket of bytes, ``bucket_bytes`` (or the largest tensor, if larger), whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
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


def opens_bucket(bucket: list, size: int, meta: TensorMeta, bucket_bytes: int) -> bool:
    """Whether ``meta`` starts the next bucket after ``bucket`` (``size`` bytes so far): the rule both ends plan by. A
    tensor that would take a bucket past ``bucket_bytes`` opens the next one, so a tensor larger than the limit gets a
    bucket of its own."""
    return bool(bucket) and size + meta.padded_nbytes > bucket_bytes


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[TensorMeta]]:
    """Consecutive runs of tensors whose total size stays within ``bucket_bytes`` (`opens_bucket`). Order is kept, so
    both sides agree without exchanging the plan."""
    _check_limit(bucket_bytes)
    buckets: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    size = 0
    for meta in metas:
        if opens_bucket(current, size, meta, bucket_bytes):
            buckets.append(current)
            current, size = [], 0
        current.append(meta)
        size += meta.padded_nbytes
    if current:
        buckets.append(current)
    return buckets


def stream_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[list[TensorMeta], torch.Tensor]]:
    """``(metas, buffer)`` for each bucket of `plan_buckets`, built as the pairs arrive: each tensor is cast to
    ``dtype`` (None: its own) and copied into the bucket's CPU buffer, then let go, so the pairs' producer (a ZeRO-3
    gather, a LoRA merge) never has more than one tensor held here. One buffer serves every bucket (a larger one from
    the first tensor over the limit on): the caller must be done with a bucket before asking for the next."""
    _check_limit(bucket_bytes)
    buffer = torch.empty(0, dtype=torch.uint8)
    metas: list[TensorMeta] = []
    used = 0
    for name, tensor in named_tensors:
        meta = tensor_meta(name, tensor, dtype)
        if opens_bucket(metas, used, meta, bucket_bytes):
            yield metas, buffer[:used]
            metas, used = [], 0
        if used + meta.padded_nbytes > buffer.numel():  # allocated on first use: a small model needs no 64 MiB
            buffer = torch.empty(max(bucket_bytes, meta.padded_nbytes), dtype=torch.uint8)
        _write(buffer, used, meta, tensor)
        del tensor  # its bytes are in the bucket: the producer may free it before it makes the next one
        metas.append(meta)
        used += meta.padded_nbytes
    if metas:
        yield metas, buffer[:used]


def pack_bucket(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes in one uint8 buffer (CPU), each at an ``ALIGN``-byte boundary (zero padding between)."""
    metas = [tensor_meta(str(i), tensor) for i, tensor in enumerate(tensors)]
    buffer = torch.empty(bucket_nbytes(metas), dtype=torch.uint8)
    offset = 0
    for meta, tensor in zip(metas, tensors):
        _write(buffer, offset, meta, tensor)
        offset += meta.padded_nbytes
    return buffer


def _write(buffer: torch.Tensor, offset: int, meta: TensorMeta, tensor: torch.Tensor) -> None:
    """``tensor``, cast to ``meta.dtype``, at ``offset`` in ``buffer``, and zeros up to the next aligned offset. One
    ``copy_`` casts and moves it off the GPU without an intermediate copy."""
    target = buffer[offset : offset + meta.nbytes].view(getattr(torch, meta.dtype)).view(meta.shape)
    target.copy_(tensor.detach())
    buffer[offset + meta.nbytes : offset + meta.padded_nbytes].zero_()


def _check_limit(bucket_bytes: int) -> None:
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")


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
