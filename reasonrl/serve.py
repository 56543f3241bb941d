"""`reasonrl serve`: vLLM's OpenAI-compatible server, set up to be a rollout engine for `rollout.engine=server`.

What it adds to plain `vllm serve`: the model name is resolved like everywhere in reasonrl (the packaged
`smollm2-135m-instruct` included); vLLM's RL routes are on (`VLLM_SERVER_DEV_MODE=1`) with the `gloo`
weight-transfer backend, so a trainer on this or another machine can push weights without CUDA; log-probs are those
of the distribution the tokens were sampled from (`processed_logprobs`, as the colocated engine); the HAPO adaptive
temperature processor is registered; and sampling defaults come from the request only, not the model's
`generation_config`. Anything after `--` goes to vLLM unchanged.
"""

from __future__ import annotations

import json
import os
import sys

ADAPTIVE_TEMPERATURE_PROCESSOR = "reasonrl.rollout.adaptive_temperature:VLLMAdaptiveTemperatureLogitsProcessor"


def vllm_server_argv(args) -> list[str]:
    from reasonrl.models import resolve_model_path
    from reasonrl.rollout.vllm_engine import CPU_BLOCK_SIZE

    argv = [
        "--model", resolve_model_path(args.model),
        "--served-model-name", args.model,
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", args.dtype or ("float32" if _cpu_only() else "bfloat16"),
        "--seed", str(args.seed),
        "--weight-transfer-config", json.dumps({"backend": "gloo"}),
        "--logprobs-mode", "processed_logprobs",
        "--logits-processors", ADAPTIVE_TEMPERATURE_PROCESSOR,
        "--generation-config", "vllm",
        "--enforce-eager",
    ]
    if args.max_model_len is not None:
        argv += ["--max-model-len", str(args.max_model_len)]
    if args.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if _cpu_only():
        # Seeded requests with chunked prefill fail on the CPU backend (see vllm_engine's module notes).
        argv += ["--no-enable-chunked-prefill"]
        if "--block-size" not in getattr(args, "passthrough", []):  # the samples of a prompt share its prefix cache
            argv += ["--block-size", str(CPU_BLOCK_SIZE)]
        if args.gpu_memory_utilization is None:
            argv += ["--gpu-memory-utilization", "0.3"]
    return argv + list(getattr(args, "passthrough", []))


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def serve(args) -> int:
    """Replace this process by vLLM's server (signals and exit codes are then vLLM's own)."""
    from reasonrl.malloc_tuning import glibc_tunables

    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *vllm_server_argv(args)]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", **glibc_tunables(os.environ))
    print("reasonrl serve:", " ".join(argv[1:]), file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="start a vLLM server that a trainer uses with rollout.engine=server; "
                       "vLLM server options go after --")
    p.add_argument("model", help="local HF folder, hub id or built-in name (e.g. smollm2-135m-instruct)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept trainers on other machines")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: float32 on CPU (vLLM's CPU bf16 path measured 3-4x slower here), bfloat16 on GPU")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's KV-cache share (CPU default 0.3: on CPU it is a share of the NUMA node's RAM)")
    p.set_defaults(func=serve)
