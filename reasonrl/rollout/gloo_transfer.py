"""Server side of weight pushes over a torch.distributed gloo group: a vLLM weight-transfer backend named ``gloo``.

vLLM's own server (0.32) exposes the RL weight-sync routes (``/init_weight_transfer_engine``, ``/start_weight_update``,
``/update_weights``, ``/finish_weight_update``) and delegates the transport to a pluggable backend. Its built-in dense
backend is NCCL, which needs CUDA; this one moves the same checkpoint-format tensors over gloo (TCP), so a CPU server
can take live weights, and a GPU server can too when NCCL between the two machines is not an option.

Protocol (the trainer is rank 0 and hosts the rendezvous store; the server's single worker is rank 1):

1. ``/init_weight_transfer_engine`` with ``{master_address, master_port, token}``: the worker joins the trainer's group.
   The token is a random secret the trainer made; it names the group's store prefix and authorises later pushes.
2. ``/update_weights`` with ``{token, names, dtype_names, shapes, bucket_bytes}``: both sides plan the same buckets
   (``weight_buckets.plan_buckets``), the trainer broadcasts each bucket, and the worker loads it through vLLM's
   layerwise reload. A push whose token is not the group's, or that comes before any client joined, is refused
   with ``PermissionError`` before anything is received or changed.
3. ``/finish_weight_update``: finalise the reload (re-runs each layer's weight processing, which rebuilds the CPU
   backend's packed GEMM weights) and refresh tied LM heads.

Registered in every vLLM process through the ``vllm.general_plugins`` entry point (``register``).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from reasonrl.rollout.weight_buckets import (
    DEFAULT_BUCKET_BYTES,
    TensorMeta,
    bucket_nbytes,
    plan_buckets,
    unpack_bucket,
)
from reasonrl.rollout.weight_group import broadcast_from_trainer, join_group, rendezvous_store

BACKEND = "gloo"
SERVER_RANK = 1


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    token: str
    timeout_s: float = 300.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    token: str
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int = DEFAULT_BUCKET_BYTES

    def metas(self) -> list[TensorMeta]:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(
                f"update info has {len(self.names)} names, {len(self.dtype_names)} dtypes and {len(self.shapes)} shapes"
            )
        return [TensorMeta(n, d, tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)]


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        if self.parallel_config.world_size != 1:
            raise ValueError(
                "the gloo weight-transfer backend supports a single-worker server (no tensor/pipeline parallelism); "
                f"this server has {self.parallel_config.world_size} workers"
            )
        self.group = None
        self.store = None
        self.token: str | None = None
        self.reloading = False

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self.shutdown()
        self.store = rendezvous_store(init_info.master_address, init_info.master_port, is_master=False,
                                      timeout_s=init_info.timeout_s)
        self.group = join_group(self.store, rank=SERVER_RANK, token=init_info.token, timeout_s=init_info.timeout_s)
        self.token = init_info.token

    def start_weight_update(self) -> None:
        """Nothing to prepare yet: the reload starts with the first authorised bucket, so a refused push (or a bare
        ``/start_weight_update`` from anyone) leaves the model untouched."""

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if self.device.type != "cpu":
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        self._authorise(update_info.token)
        metas = update_info.metas()
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if not self.reloading:
            initialize_layerwise_reload(self.model)
            self.reloading = True
        dtype = self.model_config.dtype
        for bucket in plan_buckets(metas, update_info.bucket_bytes):
            buffer = torch.empty(bucket_nbytes(bucket), dtype=torch.uint8)
            broadcast_from_trainer(self.group, buffer)
            weights = [(name, tensor.to(device=self.device, dtype=dtype)) for name, tensor in unpack_bucket(buffer, bucket)]
            self.model.load_weights(weights)

    def _authorise(self, token: str) -> None:
        if self.group is None or self.token is None:
            raise PermissionError(
                "weight push refused: no client has joined this server's weight group "
                "(call /init_weight_transfer_engine first)"
            )
        if not hmac.compare_digest(str(token), self.token):
            raise PermissionError("weight push refused: the client is not a member of this server's weight group")

    def finish_weight_update(self) -> None:
        if not self.reloading:
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from reasonrl.rollout.vllm_engine import refresh_lm_heads

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_lm_heads(self.model)
        self.reloading = False

    def shutdown(self) -> None:
        self.group = None
        self.store = None
        self.token = None
        self.reloading = False


def register() -> None:
    """vLLM plugin entry point: make ``--weight-transfer-config '{"backend": "gloo"}'`` available."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    except ValueError:  # already registered in this process
        pass
