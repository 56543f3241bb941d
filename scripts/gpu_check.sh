#!/usr/bin/env bash
# One-shot GPU verification of the Triton sparse attention kernels (which CI only runs in Triton's CPU interpreter).
#
#   bash scripts/gpu_check.sh                      # on the GPU machine, from anywhere (needs .gpu/qkv_8k.pt)
#   GPU_CHECK_QUICK=1 PYTHON=.venv/bin/python bash scripts/gpu_check.sh   # seconds-long dry run on a CPU machine
#
# Steps (each runs under its own timeout; a failed step does not stop the next):
#   env      nvidia-smi, python / torch / triton / transformers versions
#   smoke    compile and run the kernels once (bf16, SmolLM2's head shapes), forward + backward vs a float64 reference
#   tests    the kernel tests (test_triton_sparse.py on CUDA tensors, compiled kernels)
#   bench    scripts/bench_attention.py on SmolLM2 q/k/v captured from real text (.gpu/qkv_8k.pt), 2K..8K
#   long     scripts/bench_attention.py --synthetic, 16K..128K
# Full logs go to $OUT (a temporary folder when OUT is unset), plus the benches' JSON lines; stdout shows each log's
# tail and a summary. Exit status: the number of failed steps.
set -u

cd "$(dirname "$0")/.." || exit 99
PYTHON=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
QKV=.gpu/qkv_8k.pt
unset TRITON_INTERPRET  # the point is the compiled kernels
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

SUMMARY=()
FAILED=0

# run_step NAME TIMEOUT_S TAIL_LINES CMD...: runs CMD under `timeout`, full output to $LOGS/NAME.log, tail to stdout
run_step() {
    local name=$1 limit=$2 tail_lines=$3
    shift 3
    local log="$LOGS/$name.log"
    echo
    echo "================================================================================"
    echo "== $name  (timeout ${limit}s)  $(date -u +%H:%M:%S)"
    local shown="$*"
    shown=${shown//$'\n'/ }
    echo "== ${shown:0:200}"
    echo "================================================================================"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local took=$((SECONDS - start))
    tail -n "$tail_lines" "$log"
    local verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMEOUT"
    elif [ "$rc" -ne 0 ]; then
        verdict="FAILED"
    fi
    [ "$verdict" = ok ] || FAILED=$((FAILED + 1))
    echo "-- $name: $verdict (rc=$rc, ${took}s), log: $log"
    SUMMARY+=("$(printf '%-6s %-8s rc=%-4s %4ss' "$name" "$verdict" "$rc" "$took")")
}

SMOKE=$(cat <<'EOF'
import math, sys, time
import torch
from reasonrl.kernels.layout import build_block_layout
from reasonrl.kernels.pattern import PatternConfig, estimate_pattern
from reasonrl.kernels.reference import reference_sparse_attention
from reasonrl.kernels.triton_sparse import INTERPRET, triton_sparse_attention

device = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
n = int(sys.argv[1])
print(f"INTERPRET={INTERPRET} device={device} n={n}")
torch.manual_seed(0)
q = torch.randn(1, 9, n, 64).to(device, torch.bfloat16).requires_grad_()
k, v = (torch.randn(1, 3, n, 64).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
config = PatternConfig(block_size=64, last_q=64, vertical_size=100, slash_size=200, sink=4, local_window=64)
pattern = estimate_pattern(q.detach(), k.detach(), config)
layout = build_block_layout(pattern)
grad = torch.randn(q.shape).to(device, torch.bfloat16)
for attempt in ("first call (compiles)", "second call"):
    t0 = time.perf_counter()
    out = triton_sparse_attention(q, k, v, layout)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{attempt}: {time.perf_counter() - t0:.3f} s")
leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
expected = reference_sparse_attention(*leaves, pattern)
expected_grads = torch.autograd.grad(expected, leaves, grad.double())
worst = 0.0
for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected, *expected_grads)):
    err = (a.double() - b).abs().max().item()
    rel = err / b.abs().max().item()
    worst = max(worst, rel) if math.isfinite(rel) else math.inf
    print(f"{name}: max abs err {err:.3e}, relative to max |ref| {rel:.3e}")
# a coarse sanity bound (bf16 rounding gives ~1e-2); the tests hold the real tolerances
sys.exit(0 if worst < 0.1 else 1)
EOF
)

PY_VERSIONS='import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| triton", triton.__version__)
try:
    import transformers
    print("transformers", transformers.__version__)
except Exception as err:
    print("transformers: not importable:", err)
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
from reasonrl.kernels import triton_sparse
print("reasonrl.kernels.triton_sparse INTERPRET =", triton_sparse.INTERPRET)'

TESTS=(tests/kernels/test_triton_sparse.py tests/kernels/test_reference.py tests/kernels/test_pattern.py)
BENCH=("$PYTHON" scripts/bench_attention.py)

env_step() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PYTHON" -c "$PY_VERSIONS"
}

echo "gpu_check: repo $(pwd), python $PYTHON, logs in $LOGS, quick=$QUICK"
[ -f "$QKV" ] || echo "WARNING: $QKV is missing (carry .gpu): the bench step will fail"

export PYTHON PY_VERSIONS
export -f env_step
run_step env 60 40 bash -c env_step
if [ "$QUICK" = 1 ]; then  # CPU dry run: same commands, tiny sizes
    run_step smoke 120 20 "$PYTHON" -c "$SMOKE" 128
    run_step tests 60 5 "$PYTHON" -m pytest "${TESTS[@]}" -q -p no:cacheprovider --collect-only
    run_step bench 120 5 "${BENCH[@]}" --load-qkv "$QKV" --lengths 256,512 --impls dense,reference --repeats 1 --json
    run_step long 120 5 "${BENCH[@]}" --synthetic --lengths 1024 --mode topk --vertical-size 100 --slash-size 300 \
        --impls dense,reference --repeats 1 --json
else
    run_step smoke 60 20 "$PYTHON" -c "$SMOKE" 1000
    # no -x: this runs once, so every failure is worth seeing
    run_step tests 200 40 "$PYTHON" -m pytest "${TESTS[@]}" -q -p no:cacheprovider -rfE \
        --tb=short --durations=5
    run_step bench 110 6 "${BENCH[@]}" --load-qkv "$QKV" --lengths 2048,4096,8192 --impls dense,triton,reference \
        --repeats 5 --json
    run_step long 130 6 "${BENCH[@]}" --synthetic --lengths 16384,32768,65536,131072 --mode topk \
        --vertical-size 1000 --slash-size 6096 --impls dense,triton --repeats 3 --json
fi

# the benches' JSON lines as files of their own
for name in bench long; do
    grep '^{' "$LOGS/$name.log" 2>/dev/null | tail -n 1 >"$LOGS/$name.json"
    [ -s "$LOGS/$name.json" ] || rm -f "$LOGS/$name.json"
done

echo
echo "================================================================================"
echo "== summary ($FAILED failed), logs in $LOGS"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
