"""Dynamic sparse attention on a real model's attention maps: kept density, captured attention mass, and the time
of sparse vs dense attention (forward + backward), per sequence length.

    .venv/bin/python scripts/bench_attention.py                            # CPU: SmolLM2-135M, 1K..8K tokens
    .venv/bin/python scripts/bench_attention.py --lengths 8192,32768 --impls dense,triton --json   # on a GPU

The text is real (GSM8K problems and solutions concatenated, from --data); the model runs it once at the longest
length and records every selected layer's post-RoPE q, k, v (a causal model's first N positions are the same for
any longer input, so shorter lengths are prefixes). Per length and layer, the pattern is estimated from the last
`last_q` queries as in training, then:
- density: kept (query, key) pairs / causal pairs (tile-expanded: what the kernels compute);
- captured mass: per query row, the share of its true (dense softmax) attention probability that falls on kept keys,
  averaged over rows; the table shows the mean and the minimum over (layer, head);
- time: one layer's attention, forward + backward, median of --repeats, for each implementation (`dense` = torch
  SDPA causal, flash-attention kernels on a GPU; `reference` = our blockwise PyTorch reference; `triton` = our
  kernels, GPU only); the sparse times include the pattern estimation.
With --json the last line is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(DATA), help="jsonl with question/answer fields (the text)")
    p.add_argument("--lengths", default="1024,2048,4096,8192")
    p.add_argument("--layers", default="0,7,15,22,29", help="layer indices to measure")
    p.add_argument("--impls", default=None, help="dense,reference,triton (default: dense,reference on CPU, "
                                                 "dense,triton on CUDA)")
    p.add_argument("--mode", default="mass", choices=["topk", "mass"])
    p.add_argument("--mass", type=float, default=0.95)
    p.add_argument("--vertical-size", type=int, default=512)
    p.add_argument("--slash-size", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--last-q", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--json", action="store_true")
    return p.parse_args()


def long_text(path: str, tokenizer, length: int) -> torch.Tensor:
    if not Path(path).is_file():
        raise SystemExit(f"--data {path} not found: pass a jsonl file with question/answer fields")
    ids: list[int] = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            ids += tokenizer(f"Question: {row['question']}\nAnswer: {row['answer']}\n\n")["input_ids"]
            if len(ids) >= length:
                return torch.tensor(ids[:length])[None]
    raise SystemExit(f"{path} has fewer than {length} tokens")


def capture_qkv(model_name: str, data: str, length: int, layers: list[int], dtype, device):
    """{layer: (q [1, H, N, D], k [1, Hk, N, D], v)} of the model on `length` real tokens."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from reasonrl.models import load_model, load_tokenizer, resolve_model_path

    captured = {}

    def recording(module, query, key, value, *args, **kwargs):
        if module.layer_idx in layers:
            captured[module.layer_idx] = (query.detach(), key.detach(), value.detach())
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("bench_capture", recording)
    path = resolve_model_path(model_name)
    model = load_model(path, dtype=dtype, attn_implementation="bench_capture").to(device).eval()
    if length > model.config.max_position_embeddings:
        raise SystemExit(f"--lengths up to {model.config.max_position_embeddings} for {model_name}")
    ids = long_text(data, load_tokenizer(path), length).to(device)
    with torch.no_grad():
        model(input_ids=ids, logits_to_keep=1)
    return captured


def captured_mass(q, k, mask, scale: float, rows_per_chunk: int = 1024) -> torch.Tensor:
    """[H]: mean over query rows of the dense causal softmax mass on kept keys."""
    from reasonrl.kernels.pattern import repeat_kv

    k = repeat_kv(k, q.shape[1]).float()
    n = q.shape[2]
    total = torch.zeros(q.shape[1], device=q.device)
    for start in range(0, n, rows_per_chunk):
        end = min(start + rows_per_chunk, n)
        logits = torch.matmul(q[0, :, start:end].float(), k[0].transpose(-1, -2)) * scale
        causal = torch.arange(n, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        total += (probs * mask[0, :, start:end]).sum(dim=(-1, -2))
    return total / n


def pattern_density_and_mass(q, k, config):
    from reasonrl.kernels.pattern import estimate_pattern, pattern_mask

    n = q.shape[2]
    scale = q.shape[-1] ** -0.5
    pattern = estimate_pattern(q, k, config, scale)
    mask = pattern_mask(pattern)
    density = float(mask.sum()) / (q.shape[1] * n * (n + 1) / 2)
    return density, captured_mass(q, k, mask, scale)


def time_impl(impl: str, q, k, v, config, repeats: int) -> float:
    from reasonrl.kernels.attention import SparseAttentionConfig, dense_causal_attention, sparse_attention

    sparse = SparseAttentionConfig(impl=impl, dense_below=0, blockwise_above=0, pattern=config)
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    grad = torch.randn_like(q)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up (Triton compiles, allocator)
        if q.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = dense_causal_attention(q, k, v) if impl == "dense" else sparse_attention(q, k, v, sparse)
        torch.autograd.grad(out, (q, k, v), grad)
        if q.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main():
    args = parse_args()
    from reasonrl.kernels.pattern import PatternConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    impls = (args.impls or ("dense,triton" if device.type == "cuda" else "dense,reference")).split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    layers = [int(x) for x in args.layers.split(",")]
    config = PatternConfig(block_size=args.block_size, last_q=args.last_q, mode=args.mode, mass=args.mass,
                           vertical_size=args.vertical_size, slash_size=args.slash_size,
                           sink=min(30, args.vertical_size), local_window=min(100, args.slash_size))
    captured = capture_qkv(args.model, args.data, max(lengths), layers, dtype, device)
    rows = []
    for n in lengths:
        densities, masses = [], []
        for layer in layers:
            q, k, _ = (x[:, :, :n] for x in captured[layer])
            density, mass = pattern_density_and_mass(q, k, config)
            densities.append(density)
            masses.append(mass)
        masses = torch.cat(masses)
        q, k, v = (x[:, :, :n].contiguous() for x in captured[layers[len(layers) // 2]])
        times = {impl: time_impl(impl, q, k, v, config, args.repeats) for impl in impls}
        row = {"length": n, "density": statistics.mean(densities), "mass_mean": float(masses.mean()),
               "mass_min": float(masses.min()), **{f"{impl}_s": t for impl, t in times.items()}}
        for impl in impls:
            if impl != "dense" and "dense" in times:
                row[f"speedup_{impl}"] = times["dense"] / times[impl]
        rows.append(row)
        print(format_row(row, impls), flush=True)
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": dtype,
               "model": args.model, "layers": layers, "pattern": vars(config), "rows": rows}
    if args.json:
        print(json.dumps(summary))


def format_row(row: dict, impls: list[str]) -> str:
    parts = [f"N={row['length']:>6}", f"density={row['density']:.3f}",
             f"mass mean={row['mass_mean']:.4f} min={row['mass_min']:.4f}"]
    parts += [f"{impl}={row[f'{impl}_s'] * 1e3:.1f} ms" for impl in impls]
    parts += [f"speedup[{impl}]={row[f'speedup_{impl}']:.2f}x" for impl in impls if f"speedup_{impl}" in row]
    return "  ".join(parts)


if __name__ == "__main__":
    main()
