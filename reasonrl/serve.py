"""`reasonrl serve`: vLLM's OpenAI-compatible server, set up to be a rollout engine for `rollout.engine=server`.

What it adds to plain `vllm serve`: the model name is resolved like everywhere in reasonrl (the packaged
`smollm2-135m-instruct` included); vLLM's RL routes are on (`VLLM_SERVER_DEV_MODE=1`) with the `gloo`
weight-transfer backend, so a trainer on this or another machine can push weights without CUDA; log-probs are those
of the distribution the tokens were sampled from (`processed_logprobs`, as the colocated engine); the HAPO adaptive
temperature processor is registered; sampling defaults come from the request only, not the model's
`generation_config`; and only a caller with the weight token given at start may change the weights, only one trainer
at a time, and with `--api-key` every route but /health needs the key (`reasonrl.rollout.server_auth`). Anything
after `--` goes to vLLM unchanged.
"""

from __future__ import annotations

import json
import os
import sys

ADAPTIVE_TEMPERATURE_PROCESSOR = "reasonrl.rollout.adaptive_temperature:VLLMAdaptiveTemperatureLogitsProcessor"
ROUTE_GUARD = "reasonrl.rollout.server_auth.RouteGuard"


def vllm_server_argv(args) -> list[str]:
    from reasonrl.models import resolve_model_path
    from reasonrl.rollout.vllm_engine import CPU_BLOCK_SIZE

    if "--api-key" in getattr(args, "passthrough", []):  # vLLM's own key would leave the RL routes open
        raise ValueError("give the API key as `reasonrl serve --api-key KEY` (or REASONRL_API_KEY), not after --: "
                         "then every route but /health needs it, not only vLLM's /v1 routes")

    argv = [
        "--model", resolve_model_path(args.model),
        "--served-model-name", args.model,
        "--host", args.host,
        "--port", str(args.port),
        "--dtype", _server_dtype(args.dtype),
        "--seed", str(args.seed),
        "--weight-transfer-config", json.dumps({"backend": "gloo"}),
        "--logprobs-mode", "processed_logprobs",
        "--logits-processors", ADAPTIVE_TEMPERATURE_PROCESSOR,
        "--generation-config", "vllm",
        "--enforce-eager",
        "--middleware", ROUTE_GUARD,
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


def _server_dtype(requested: str | None) -> str:
    """--dtype: as given; auto: bf16 where the hardware has fast bf16 (reasonrl/precision.py); unset: float32 on CPU
    (on an AVX2-only CPU vLLM's bf16 path measured 3-4x slower), bfloat16 on GPU."""
    if requested == "auto":
        from reasonrl.precision import resolve_precision

        return resolve_precision("auto", "cpu" if _cpu_only() else "cuda").dtype
    return requested or ("float32" if _cpu_only() else "bfloat16")


def _cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def server_secrets(args, environ) -> dict[str, str]:
    """The environment entries that hand the server its secrets (never its command line, which `ps` shows):
    ``REASONRL_WEIGHT_TOKEN`` from --weight-token-file (else the caller's REASONRL_WEIGHT_TOKEN or
    REASONRL_WEIGHT_TOKEN_FILE), ``VLLM_API_KEY`` from --api-key (else REASONRL_API_KEY)."""
    from reasonrl.rollout import server_auth

    if args.weight_token_file:
        token = server_auth.read_secret_file(args.weight_token_file)
    else:
        token = server_auth.weight_token_from_env(environ)
    out = {} if token is None else {server_auth.WEIGHT_TOKEN_ENV: server_auth.check_weight_token(token)}
    api_key = args.api_key or environ.get(server_auth.API_KEY_ENV)
    if api_key:
        out[server_auth.VLLM_API_KEY_ENV] = api_key
    return out


def serve(args) -> int:
    """Replace this process by vLLM's server (signals and exit codes are then vLLM's own)."""
    from reasonrl.malloc_tuning import glibc_tunables
    from reasonrl.rollout.server_auth import WEIGHT_TOKEN_ENV

    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *vllm_server_argv(args)]
    secrets = server_secrets(args, os.environ)
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", **glibc_tunables(os.environ), **secrets)
    print("reasonrl serve:", " ".join(argv[1:]), file=sys.stderr, flush=True)
    if WEIGHT_TOKEN_ENV not in secrets:
        print("reasonrl serve: no weight token (--weight-token-file): weight pushes are refused, the server keeps "
              "the weights it loads", file=sys.stderr, flush=True)
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="start a vLLM server that a trainer uses with rollout.engine=server; "
                       "vLLM server options go after --")
    p.add_argument("model", help="local HF folder, hub id or built-in name (e.g. smollm2-135m-instruct)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only). 0.0.0.0 listens on every interface, "
                   "so every machine that reaches the port can use the server: without --api-key anyone can "
                   "generate and read /server_info, and whoever has the weight token can push weights. Give "
                   "--api-key there, and keep it on a private network: the keys travel in plain HTTP (no TLS)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, choices=["auto", "bfloat16", "float16", "float32"],
                   help="default: float32 on CPU, bfloat16 on GPU; auto: bfloat16 where the hardware has fast bf16 "
                   "(CUDA with bf16, a CPU with AVX512_BF16 or AMX_BF16), else float32")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's KV-cache share (CPU default 0.3: on CPU it is a share of the NUMA node's RAM)")
    p.add_argument("--weight-token-file", metavar="FILE",
                   help="file holding the secret a trainer must present to push weights (default: the "
                   "REASONRL_WEIGHT_TOKEN or REASONRL_WEIGHT_TOKEN_FILE environment variable; none: no pushes). "
                   "The trainer reads the same variables")
    p.add_argument("--api-key", help="API key every route but /health then needs (Authorization: Bearer KEY; "
                   "default: REASONRL_API_KEY, which keeps it off the command line). The trainer reads REASONRL_API_KEY")
    p.set_defaults(func=serve)
