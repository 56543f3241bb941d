"""Pure parts of reasonrl/trainers/distributed.py: DeepSpeed config checks, bucketing, peer-failure detection."""

import os
import time

import pytest
import torch

from reasonrl.rollout.server_engine import ServerUnavailableError
from reasonrl.trainers.distributed import (
    LaunchConfigError,
    _buckets,
    check_launch_precision,
    configure_deepspeed,
    full_named_parameters,
    is_peer_failure,
)


class _Plugin:
    def __init__(self, cfg):
        self.deepspeed_config = cfg


class _Acc:
    num_processes = 4

    def __init__(self, cfg):
        self.state = type("S", (), {"deepspeed_plugin": _Plugin(cfg)})()


def test_configure_deepspeed_fills_the_open_values_from_the_recipe():
    cfg = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3}}
    configure_deepspeed(_Acc(cfg), max_grad_norm=0.5)
    assert cfg["gradient_clipping"] == 0.5 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["train_batch_size"] == 4
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("cfg, key", [
    ({"optimizer": {"type": "AdamW"}}, "'optimizer'"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
    ({"gradient_clipping": 2.0}, "gradient_clipping=2.0"),
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps=4"),
])
def test_configure_deepspeed_refuses_what_the_recipe_owns(cfg, key):
    with pytest.raises(LaunchConfigError, match=key):
        configure_deepspeed(_Acc(cfg), max_grad_norm=1.0)


@pytest.mark.parametrize("bf16", [False, True])
def test_configure_deepspeed_sets_the_precision_the_recipe_resolved_to(bf16):
    cfg = {"bf16": {"enabled": False}}  # what accelerate writes for mixed_precision: no
    configure_deepspeed(_Acc(cfg), max_grad_norm=1.0, bf16=bf16)
    assert cfg["bf16"] == {"enabled": bf16} and cfg["fp16"] == {"enabled": False}


@pytest.mark.parametrize("cfg, bf16, key", [
    ({"bf16": {"enabled": True}}, False, "bf16.enabled=True"),
    ({"fp16": {"enabled": True}}, True, "fp16.enabled=True"),
    ({"fp16": {"enabled": True}}, False, "fp16.enabled=True"),
])
def test_configure_deepspeed_refuses_a_precision_that_contradicts_the_recipe(cfg, bf16, key):
    with pytest.raises(LaunchConfigError, match=key):
        configure_deepspeed(_Acc(cfg), max_grad_norm=1.0, bf16=bf16)


def test_accelerates_own_mixed_precision_is_refused():
    check_launch_precision(type("A", (), {"mixed_precision": "no"})())
    with pytest.raises(LaunchConfigError, match="mixed_precision=bf16.*model.dtype"):
        check_launch_precision(type("A", (), {"mixed_precision": "bf16"})())


def test_buckets_respect_the_byte_budget_and_keep_order():
    named = [(f"p{i}", torch.zeros(n)) for i, n in enumerate([3, 3, 10, 1, 1, 1])]  # float32: 4 bytes each
    buckets = list(_buckets(named, bucket_bytes=24))
    assert [[n for n, _ in b] for b in buckets] == [["p0", "p1"], ["p2"], ["p3", "p4", "p5"]]


def test_without_zero3_full_parameters_are_the_parameters_themselves():
    model = torch.nn.Linear(3, 2)
    assert [(n, p) for n, p in full_named_parameters(model, None)] == list(model.named_parameters())
    assert all(a is b for (_, a), (_, b) in zip(full_named_parameters(model, 2), model.named_parameters()))


_GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                "[127.0.0.1]:17086. This is typically caused by a remote worker crashing.")
_GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                 "3000ms for recv operation to complete")


@pytest.mark.parametrize("err, peer", [
    (RuntimeError(_GLOO_CLOSED), True),
    (RuntimeError(_GLOO_TIMEOUT), True),
    (RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9629: Connection "
                  "reset by peer."), True),
    (torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1"), True),
    (torch.distributed.DistNetworkError("failed to recv, got 0 bytes"), True),
    (torch.distributed.DistStoreError("Timed out after 301 seconds waiting for clients. 1/2 clients joined."), True),
    # not a collective: the process's own errors, even when their text looks like a network failure
    (ServerUnavailableError("vLLM server at http://127.0.0.1:8000 did not answer POST /generate (timed out)"), False),
    (RuntimeError("request timed out"), False),
    (RuntimeError("NCCL is not available in this build"), False),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError(_GLOO_CLOSED), False),
    (RuntimeError("[enforce fail at ../third_party/gloo/gloo/transport/tcp/pair.cc:446] op.preamble.length <= "
                  "op.nbytes. 16 vs 8"), False),  # ranks disagree on a tensor's size: a bug, not a dead peer
    (RuntimeError(f"reward failed: {_GLOO_CLOSED}"), False),  # gloo's text quoted inside another error
])
def test_only_collective_failures_count_as_a_dead_peer(err, peer):
    assert is_peer_failure(err) is peer


def _collective_after_peer_leaves(rank: int, port: int, how: str, results) -> None:
    from datetime import timedelta

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=2))
    torch.distributed.barrier()
    if rank == 1:
        deadline = time.monotonic() + 30
        while how == "stalls" and "error" not in results and time.monotonic() < deadline:
            time.sleep(0.05)  # alive but silent until rank 0's collective has timed out
        os._exit(0)  # no teardown, like a killed process
    try:
        torch.distributed.all_reduce(torch.ones(2))
    except RuntimeError as err:
        results["error"] = (is_peer_failure(err), str(err).splitlines()[0])
    os._exit(0)


@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_the_error_of_a_real_gloo_collective_whose_peer_dies_or_stalls_counts(how, free_port):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    # fork: spawned children would import torch and accelerate again, 12 s per case on 2 cores
    context = mp.start_processes(_collective_after_peer_leaves, args=(free_port(), how, results), nprocs=2,
                                 join=False, start_method="fork")
    for proc in context.processes:
        proc.join(timeout=60)
    assert "error" in results, "rank 0's collective did not fail"
    classified, text = results["error"]
    assert classified, text


def _leave_in_a_two_rank_group(rank: int, port: int, results) -> None:
    from reasonrl.trainers.distributed import leave_process_group

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    leave_process_group()
    results[rank] = torch.distributed.is_initialized()


def test_leave_process_group_tears_a_multi_rank_group_down_on_every_rank():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_leave_in_a_two_rank_group, args=(port, results), nprocs=2, join=True)
    assert dict(results) == {0: False, 1: False}


def test_leave_process_group_keeps_a_one_process_group_for_its_owner():
    from reasonrl.trainers.distributed import leave_process_group

    created = not torch.distributed.is_initialized()  # another test of this process may hold one already
    if created:
        torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        assert torch.distributed.get_world_size() == 1
        leave_process_group()
        assert torch.distributed.is_initialized()
    finally:
        if created:
            torch.distributed.destroy_process_group()
