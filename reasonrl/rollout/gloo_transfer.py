"""Server side of weight pushes over a torch.distributed gloo group: a vLLM weight-transfer backend named ``gloo``.

vLLM's own server (0.32) exposes the RL weight-sync routes (``/init_weight_transfer_engine``, ``/start_weight_update``,
``/update_weights``, ``/finish_weight_update``) and delegates the transport to a pluggable backend. Its built-in dense
backend is NCCL, which needs CUDA; this one moves the same checkpoint-format tensors over gloo (TCP), so a CPU server
can take live weights, and a GPU server can too when NCCL between the two machines is not an option.

Protocol (the trainer is rank 0 and hosts the rendezvous store; the server's single worker is rank 1):

1. ``/init_weight_transfer_engine`` with ``{master_address, master_port, token, group_id}``: the worker joins the
   trainer's group (store prefix ``group_id``, a random name per group). ``token`` must be the server's weight token
   (`server_auth`: given at start, ``REASONRL_WEIGHT_TOKEN`` in the worker's environment), compared in constant time;
   a server without one, a wrong token, or a second group while the first one's trainer is still alive (its store
   answers) is refused with ``PermissionError`` and the active group stays. A group whose trainer is gone (killed
   without closing it) is replaced, so a restarted trainer can join again.
2. ``/update_weights`` with ``{token, names, dtype_names, shapes, bucket_bytes}``: both sides plan the same buckets
   (``weight_buckets.plan_buckets``), the trainer broadcasts each bucket, and the worker loads it through vLLM's
   layerwise reload. `ServerEngine` makes one such call per bucket (vLLM takes any number of them between start and
   finish), so that it never needs the whole model's metadata, or tensors, up front. A push without the token, or
   before any group was opened, is refused with ``PermissionError`` before anything is received or changed. The
   worker waits for each bucket at most the group's ``timeout_s`` (the trainer's ``rollout.server_timeout_s``). A
   push that stops half-way leaves the model part-reloaded: the next push finalises that reload first (see
   `start_weight_update`; a trainer that joins closes an update vLLM still counts as open), then replaces every
   weight.
3. ``/finish_weight_update``: finalise the reload (re-runs each layer's weight processing, which rebuilds the CPU
   backend's packed GEMM weights) and refresh tied LM heads.
4. ``/shutdown_weight_transfer_engine``: the trainer closes its group (`ServerEngine.close`); the next one may join.

Registered in every vLLM process through the ``vllm.general_plugins`` entry point (``register``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from reasonrl.rollout.server_auth import token_matches, weight_token_from_env
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
LIVENESS_TIMEOUT = datetime.timedelta(seconds=5)  # how long the trainer's store may take to answer "are you there"


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    token: str
    group_id: str = ""
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
        self.secret = weight_token_from_env()  # set by `reasonrl serve`; None: no pushes at all
        self.group = None
        self.store = None
        self.reloading = False

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        self._check_token(init_info.token, "weight group refused")
        if self.group is not None and self._trainer_alive():
            raise PermissionError(
                "weight group refused: another trainer's weight group is active on this server; it must close it "
                "(ServerEngine.close, POST /shutdown_weight_transfer_engine) or exit first"
            )
        self.shutdown()
        self.store = rendezvous_store(init_info.master_address, init_info.master_port, is_master=False,
                                      timeout_s=init_info.timeout_s)
        self.group = join_group(self.store, rank=SERVER_RANK, group_id=init_info.group_id,
                                timeout_s=init_info.timeout_s)

    def _trainer_alive(self) -> bool:
        """Whether the active group's trainer still answers on its rendezvous store (it hosts the store, so a killed
        trainer's store is gone and the probe fails at once)."""
        try:
            self.store.set_timeout(LIVENESS_TIMEOUT)
            self.store.check(["reasonrl-alive"])
        except (RuntimeError, OSError):  # DistNetworkError / DistStoreError are RuntimeErrors
            return False
        return True

    def start_weight_update(self) -> None:
        """Nothing to prepare: the reload starts with the first authorised bucket, so a refused push leaves the model
        untouched. A reload a push left unfinished (its trainer died or gave up between buckets) is finalised here
        first: its layers' buffered weights would otherwise mix with this push's (vLLM's layerwise reload resumes a
        layer it had begun)."""
        self.finish_weight_update()

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
        self._check_token(token, "weight push refused")
        if self.group is None:
            raise PermissionError(
                "weight push refused: no client has joined this server's weight group "
                "(call /init_weight_transfer_engine first)"
            )

    def _check_token(self, token: object, refused: str) -> None:
        if self.secret is None:
            raise PermissionError(f"{refused}: this server was started without a weight token "
                                  "(reasonrl serve --weight-token-file FILE), so it takes no weight pushes")
        if not token_matches(token, self.secret):
            raise PermissionError(f"{refused}: wrong weight token")

    def finish_weight_update(self) -> None:
        if not self.reloading:
            return
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from reasonrl.rollout.vllm_engine import refresh_lm_heads

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_lm_heads(self.model)
        self.reloading = False

    def shutdown(self) -> None:
        """Forget the group. An unfinished reload is kept, to be finalised before the next push (`start_weight_update`,
        or the next trainer's `/finish_weight_update` when vLLM still counts the abandoned update as open)."""
        self.group = None
        self.store = None


def register() -> None:
    """vLLM plugin entry point: make ``--weight-transfer-config '{"backend": "gloo"}'`` available."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, GlooWeightTransferEngine)
    except ValueError:  # already registered in this process
        pass
