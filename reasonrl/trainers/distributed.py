"""The process layout a run was launched with (one process, DDP, DeepSpeed ZeRO-1/2/3), and the few places where
the trainer must treat them differently: building the Accelerator, gathering sharded parameters bucket by bucket,
and an optimizer state that any layout can save and load.

DeepSpeed comes from `accelerate launch --config_file recipes/accelerate/zero{2,3}.yaml`; the recipe's `optim.*`
keys stay the single source of the optimizer, clipping and micro-batching.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType


def launched_with_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def build_accelerator(collective_timeout_s: float) -> Accelerator:
    """The Accelerator for this launch. On a machine without CUDA the process group is gloo, also under DeepSpeed
    (accelerate would otherwise see DeepSpeed's ranks as one process). `collective_timeout_s` bounds every
    collective: a rank that died makes the others fail after it instead of hanging."""
    cuda = torch.cuda.is_available()
    kwargs = {"timeout": timedelta(seconds=collective_timeout_s)}
    if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        kwargs["backend"] = "gloo"
    return Accelerator(cpu=not cuda and not launched_with_deepspeed(),
                       kwargs_handlers=[InitProcessGroupKwargs(**kwargs)])


def leave_process_group() -> None:
    """End a finished multi-process run cleanly: wait for every rank, then tear the default process group down.

    Left to interpreter shutdown, the group's gloo threads and rank 0's TCP store are destroyed in no set order, and
    a rank can abort after a complete run ("terminate called without an active exception", seen once in CI under
    ZeRO-3). The barrier keeps rank 0, which hosts the store, from leaving while a peer still uses it.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return  # one process: a group here belongs to whoever made it (vLLM's engine tears its own down)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def zero_stage(acc) -> int | None:
    """DeepSpeed's ZeRO stage, or None without DeepSpeed."""
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


class LaunchConfigError(ValueError):
    """The DeepSpeed config contradicts the recipe."""


def check_launch_precision(acc) -> None:
    """accelerate's own mixed precision (`accelerate launch --mixed_precision`, `mixed_precision:` in a launch
    config) is refused: the recipe's model.dtype decides, so that one key says what a run computes in."""
    if acc.mixed_precision != "no":
        raise LaunchConfigError(f"the launch sets mixed_precision={acc.mixed_precision}: set model.dtype in the recipe "
                                "instead (auto, bfloat16 or float32) and launch with mixed_precision: no")


def configure_deepspeed(acc, *, max_grad_norm: float, bf16: bool = False) -> None:
    """Fill the DeepSpeed config's open values from the recipe before `accelerate.prepare`.

    The trainer forms micro-batches itself (one `engine.backward` each, the step at the last), so DeepSpeed sees a
    micro-batch of 1 and no accumulation of its own; clipping is `optim.max_grad_norm`. An optimizer or scheduler
    section in the DeepSpeed config is refused: the recipe owns them. `bf16` (model.dtype resolved to bfloat16)
    turns on DeepSpeed's bf16 mode: bf16 copies of the weights compute, the optimizer steps float32 master weights
    (`master_weights`); a DeepSpeed config that enables a precision the recipe did not resolve to is refused.
    """
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise LaunchConfigError(f"the DeepSpeed config has a '{section}' section: remove it, the recipe's optim.* "
                                    "keys define the optimizer and the learning-rate schedule")
    for section, wanted in (("fp16", False), ("bf16", bf16)):
        enabled = cfg.get(section, {}).get("enabled", "auto")  # accelerate writes False from mixed_precision: no
        if enabled is True and not wanted:
            raise LaunchConfigError(f"the DeepSpeed config sets {section}.enabled={enabled}, but the recipe's "
                                    f"model.dtype resolved to {'bfloat16' if bf16 else 'float32'}: remove the "
                                    f"'{section}' section (model.dtype decides the precision)")
        cfg[section] = {**cfg.get(section, {}), "enabled": wanted}
    clip = cfg.get("gradient_clipping", "auto")
    if clip not in ("auto", None) and float(clip) != float(max_grad_norm):
        raise LaunchConfigError(f"the DeepSpeed config sets gradient_clipping={clip} but optim.max_grad_norm="
                                f"{max_grad_norm}: remove it from the launch config (the recipe owns clipping)")
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", None, 1):
        raise LaunchConfigError(f"the DeepSpeed config sets gradient_accumulation_steps={gas}: leave it out; micro-"
                                "batches come from optim.micro_batch_size (or optim.micro_batch_tokens)")
    cfg["gradient_clipping"] = float(max_grad_norm)
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_micro_batch_size_per_gpu"] = 1
    cfg["train_batch_size"] = acc.num_processes
    cfg.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def gathered(params: list, stage: int | None):
    """Under ZeRO-3, the full values of `params` inside the block (read-only); otherwise nothing to do."""
    if stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_named_parameters(module, stage: int | None, bucket_bytes: int = 64 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for every parameter. Under ZeRO-3 the shards are gathered a bucket of about
    `bucket_bytes` at a time and released after it, so no rank ever holds the whole model; a consumer must copy each
    tensor before asking for the next bucket (the vLLM weight loaders do)."""
    named = list(module.named_parameters())
    if stage != 3:
        yield from named
        return
    for bucket in _buckets(named, bucket_bytes):
        with gathered([p for _, p in bucket], stage):
            yield from bucket


def sharded_inference_engine(model, acc):
    """A frozen model (the KL reference) sharded like the policy under ZeRO-3, with no optimizer: every rank keeps
    1/N of it and its forwards gather layer by layer, as the policy's do (call after the policy's `prepare`, whose
    processing fills the config's open values)."""
    import copy

    import deepspeed

    cfg = copy.deepcopy(acc.state.deepspeed_plugin.deepspeed_config)
    cfg.pop("optimizer", None)
    cfg.get("zero_optimization", {}).pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine


def _buckets(named: list, bucket_bytes: int) -> Iterator[list]:
    bucket, size = [], 0
    for name, p in named:
        nbytes = _full_numel(p) * p.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, p))
        size += nbytes
    if bucket:
        yield bucket


def _full_numel(p) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def backward(acc, model, loss: torch.Tensor, *, last: bool) -> None:
    """Backward of one micro-batch. Under DeepSpeed the engine accumulates until `last` (the step's final
    micro-batch), where it reduces the gradients; elsewhere accelerate's backward (DDP's no_sync is the caller's)."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss)
    else:
        acc.backward(loss)


def optimizer_step(acc, model, optimizer, *, max_grad_norm: float) -> float:
    """Clip to `max_grad_norm`, step, zero the gradients; returns the gradient norm before clipping."""
    if acc.distributed_type == DistributedType.DEEPSPEED:
        model.step()  # clips (gradient_clipping = optim.max_grad_norm), steps the sharded optimizer, zeroes
        return float(model.get_global_grad_norm())
    grad_norm = acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


# gloo raises a plain RuntimeError that starts with its source location; a peer that died or stalled shows up in
# its transport layer as one of these (torch 2.13: "[.../gloo/transport/tcp/pair.cc:553] Connection closed by peer
# ...", "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete").
# An "enforce fail" there is a size mismatch between ranks: a bug that keeps its traceback.
_GLOO_TRANSPORT = re.compile(r"^\[[^\]]*gloo/transport/[^\]]*\]")
_GLOO_PEER_LOST = ("connection closed by peer", "connection reset by peer", "read error", "write error",
                   "read timeout", "write timeout", "connect timeout", "timed out waiting")


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` came from a collective whose peer died or stalled: torch's DistError (NCCL and store failures,
    DistBackendError / DistNetworkError / DistStoreError), or gloo's transport error for a lost or silent peer.
    Anything else (an HTTP timeout, a shape error) is the process's own error."""
    import torch.distributed as dist

    if isinstance(err, dist.DistError):
        return True
    text = str(err)
    return (type(err) is RuntimeError and _GLOO_TRANSPORT.match(text) is not None
            and any(mark in text.lower() for mark in _GLOO_PEER_LOST))


# ------------------------------------------------------------------------------ bf16 master weights (DeepSpeed)
def master_weights(params: list, stage: int | None, keep: bool = True) -> list[torch.Tensor] | None:
    """The float32 values the optimizer steps, one full tensor per parameter of `params` (in order). Under
    DeepSpeed's bf16 mode the module holds bf16 copies and these live in the optimizer's partitions (gathered here,
    one parameter at a time: every rank must call); otherwise they are the parameters themselves. keep=False (the
    ranks that do not write the checkpoint): take part in the gathers, hold nothing, return None."""
    if stage is None:
        return [p.detach().float().cpu() for p in params] if keep else None
    from deepspeed.utils import safe_get_full_fp32_param

    kept = []
    for p in params:
        full = safe_get_full_fp32_param(p)  # None: a parameter DeepSpeed keeps no fp32 copy of
        if keep:
            kept.append((full if full is not None else p.detach()).reshape(_full_shape(p)).float().cpu())
    return kept if keep else None


def load_master_weights(params: list, stage: int | None, values: list[torch.Tensor]) -> None:
    """Sets the float32 masters of `params` (DeepSpeed bf16 mode: the optimizer's partitions, and the bf16 copies
    from them; otherwise the parameters). Every rank must call."""
    if len(values) != len(params):
        raise ValueError(f"{len(values)} saved master weights for {len(params)} trainable parameters")
    if stage is None or not any(p.dtype == torch.bfloat16 for p in params):
        with torch.no_grad():
            for p, value in zip(params, values):
                p.copy_(value.reshape(p.shape))
        return
    from deepspeed.utils import safe_set_full_fp32_param

    for p, value in zip(params, values):
        safe_set_full_fp32_param(p, value.reshape(-1).to(torch.float32))


# ---------------------------------------------------------------------------------------- optimizer state
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def portable_optimizer_state(optimizer, params: list, stage: int | None) -> dict | None:
    """The optimizer state as a plain `torch.optim.AdamW.state_dict()` over `params` (the trainable parameters, in
    order), whatever the layout: under ZeRO each parameter's moments are gathered from their shards one at a time.
    Every rank must call it (collective under ZeRO); returns the dict on every rank."""
    if stage is None:
        return optimizer.state_dict()
    from deepspeed.utils import safe_get_full_optimizer_state

    inner = _zero_optimizer(optimizer)
    base = inner.optimizer  # the torch AdamW over the flat fp32 partitions
    flat_states = [base.state[p] for p in _flat_partitions(inner, stage) if p in base.state]
    state = {}
    if flat_states:  # before the first step there are no moments yet
        step = flat_states[0]["step"]
        for i, p in enumerate(params):
            entry = {"step": step.detach().clone() if torch.is_tensor(step) else torch.tensor(float(step))}
            for key in ADAM_STATE_KEYS:
                entry[key] = safe_get_full_optimizer_state(p, key).detach().reshape(_full_shape(p)).cpu()
            state[i] = entry
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(params)))}
              for g in base.param_groups[:1]]
    return {"state": state, "param_groups": groups}


def load_portable_optimizer_state(optimizer, params: list, stage: int | None, saved: dict) -> None:
    """Loads a `portable_optimizer_state` dict (saved under any layout) into this run's optimizer."""
    if stage is None:
        optimizer.load_state_dict(saved)
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    inner = _zero_optimizer(optimizer)
    base = inner.optimizer
    for group in base.param_groups:
        for key in ("lr", "betas", "eps", "weight_decay"):
            if key in saved["param_groups"][0]:
                group[key] = saved["param_groups"][0][key]
    if not saved["state"]:
        return
    step = saved["state"][0]["step"]
    for flat in _flat_partitions(inner, stage):  # create the moments the shards map into, as AdamW's first step would
        base.state[flat] = {"step": step.detach().clone().to(flat.device) if torch.is_tensor(step) else step,
                            **{key: torch.zeros_like(flat) for key in ADAM_STATE_KEYS}}
    if stage in (1, 2):
        inner._hp_optimizer_states_linked = False
        inner._lazy_init_hp_params_optimizer_state()  # maps each parameter's fragment into the new moments
    for i, p in enumerate(params):
        for key in ADAM_STATE_KEYS:
            safe_set_full_optimizer_state(p, saved["state"][i][key].reshape(-1).to(torch.float32), key)


def _flat_partitions(inner, stage: int) -> list:
    """This rank's flat fp32 partitions, the tensors torch's AdamW keeps state for under ZeRO (stage 3 steps them
    one sub-group at a time, so they are not in the optimizer's param_groups between steps)."""
    return list(inner.fp32_partitioned_groups_flat if stage == 3 else inner.single_partition_of_fp32_groups)


def _zero_optimizer(optimizer):
    """The DeepSpeed ZeRO optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _full_shape(p) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


def fingerprint(params: Iterable, stage: int | None) -> torch.Tensor:
    """Per-tensor float64 sums and absolute sums of the full parameters (gathered under ZeRO-3)."""
    sums, abs_sums = [], []
    for p in params:
        with gathered([p], stage):
            d = p.detach().double()
            sums.append(d.sum())
            abs_sums.append(d.abs().sum())
    return torch.stack(sums + abs_sums)
