"""Pure parts of reasonrl/trainers/distributed.py: DeepSpeed config checks, bucketing, peer-failure detection."""

import pytest
import torch

from reasonrl.trainers.distributed import (
    LaunchConfigError,
    _buckets,
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


def test_buckets_respect_the_byte_budget_and_keep_order():
    named = [(f"p{i}", torch.zeros(n)) for i, n in enumerate([3, 3, 10, 1, 1, 1])]  # float32: 4 bytes each
    buckets = list(_buckets(named, bucket_bytes=24))
    assert [[n for n, _ in b] for b in buckets] == [["p0", "p1"], ["p2"], ["p3", "p4", "p5"]]


def test_without_zero3_full_parameters_are_the_parameters_themselves():
    model = torch.nn.Linear(3, 2)
    assert [(n, p) for n, p in full_named_parameters(model, None)] == list(model.named_parameters())
    assert all(a is b for (_, a), (_, b) in zip(full_named_parameters(model, 2), model.named_parameters()))


def test_peer_failures_are_told_apart_from_other_errors():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9629: "
                        "Connection reset by peer.")
    assert is_peer_failure(gloo)
    assert is_peer_failure(torch.distributed.DistBackendError("NCCL communicator was aborted"))
    assert not is_peer_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_peer_failure(ValueError("connection reset by peer"))  # only runtime errors of the backends


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
