"""The compute precision of a run, chosen from what the hardware does (`model.dtype: auto`), and the autocast that
applies it while the weights the optimizer steps stay float32.

bf16 is only worth it where the matrix units run it fast: CUDA devices with bf16, and CPUs whose ISA has AVX-512
BF16 or AMX-BF16 (there a bf16 matmul runs ~3.5x the fp32 one). On an AVX2-only CPU bf16 is emulated and several
times slower, so `auto` keeps float32. The CPU's ISA is read from torch (`torch.cpu.get_capabilities()`, the flags
its kernels dispatch on), not guessed from a CPU or model name.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # either makes oneDNN's bf16 matmul fast


@dataclass(frozen=True)
class Precision:
    """What a run computes in: `dtype` ("float32" or "bfloat16"), and the reason it was chosen."""

    dtype: str
    reason: str

    @property
    def mixed(self) -> bool:
        """bf16 compute over float32 master weights."""
        return self.dtype != "float32"

    def describe(self) -> str:
        what = "bf16 autocast over float32 master weights" if self.mixed else "float32"
        return f"precision: {what} ({self.reason})"


def choose_dtype(requested: str, *, device_type: str, cuda_bf16: bool = False,
                 cpu_flags: dict | None = None) -> Precision:
    """The dtype for `requested` ("auto" or a dtype name) on a device of `device_type` ("cuda" or "cpu"), given
    whether the CUDA device supports bf16 and the CPU's ISA flags (name -> bool, as torch reports them). Pure."""
    if requested not in DTYPES:
        raise ValueError(f"model.dtype={requested!r}: expected one of {', '.join(DTYPES)}")
    if requested != "auto":
        return Precision(requested, "set by model.dtype")
    if device_type == "cuda":
        if cuda_bf16:
            return Precision("bfloat16", "auto: the CUDA device supports bf16")
        return Precision("float32", "auto: the CUDA device has no bf16")
    flags = cpu_flags or {}
    found = [name for name in CPU_BF16_FLAGS if flags.get(name)]
    if found:
        return Precision("bfloat16", f"auto: the CPU reports {', '.join(f.upper() for f in found)}")
    return Precision("float32", "auto: the CPU reports neither AVX512_BF16 nor AMX_BF16 (bf16 would be emulated, "
                                "slower than fp32)")


def resolve_precision(requested: str, device: torch.device | str | None = None) -> Precision:
    """`choose_dtype` for the device this process computes on (CUDA when available, else the CPU)."""
    device_type = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        return choose_dtype(requested, device_type="cuda", cuda_bf16=torch.cuda.is_bf16_supported())
    return choose_dtype(requested, device_type="cpu", cpu_flags=cpu_isa_flags())


@functools.cache
def cpu_isa_flags() -> dict:
    """The CPU's ISA flags as torch reports them (cpuinfo): {"avx512_bf16": True, "amx_bf16": False, ...}."""
    return dict(torch.cpu.get_capabilities())


def autocast_forward(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """Runs every forward of `model` (training passes, no-grad passes, `generate`, whoever calls it) under autocast
    to `dtype`: matmuls in bf16 with float32 accumulation, the parameters and their gradients stay as they are
    (float32: the optimizer's master weights). Backward needs no context: autocast records the casts in the graph.
    float32: the model is returned untouched. Idempotent."""
    if dtype == "float32" or getattr(model, "_reasonrl_autocast", None) == dtype:
        return model
    forward = model.forward
    first = next(model.parameters())  # the device is read per call: accelerate may move the model after this

    @functools.wraps(forward)
    def autocast_forward_(*args, **kwargs):
        with torch.autocast(device_type=first.device.type, dtype=getattr(torch, dtype)):
            return forward(*args, **kwargs)

    model.forward = autocast_forward_
    model._reasonrl_autocast = dtype
    return model
