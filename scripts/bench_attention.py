"""Dynamic sparse attention on a real model's attention maps: kept density, captured attention mass, and the time
of sparse vs dense attention (forward + backward), per sequence length.

    .venv/bin/python scripts/bench_attention.py                            # CPU: SmolLM2-135M, 1K..8K tokens
    .venv/bin/python scripts/bench_attention.py --lengths 8192,32768 --impls dense,triton --json   # on a GPU
    .venv/bin/python scripts/bench_attention.py --lengths 8192 --layers 7,15,22 --save-qkv .gpu/qkv_8k.pt
    python3 scripts/bench_attention.py --load-qkv .gpu/qkv_8k.pt --lengths 2048,8192 --impls dense,triton
    python3 scripts/bench_attention.py --synthetic --lengths 32768,131072 --mode topk --vertical-size 1000 \
        --slash-size 6096 --impls dense,triton

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

Without the model (e.g. on a machine it cannot reach):
- `--save-qkv PATH` captures as above, saves {layer: (q, k, v)} in bf16 with metadata, and exits; `--load-qkv PATH`
  measures those tensors instead of running the model (--lengths up to the captured length);
- `--synthetic`: random q, k, v with SmolLM2-135M's shapes (9 query heads, 3 key/value heads, head dim 64) at any
  length, for the kernels' speed at long lengths. Keys are white noise averaged over --synthetic-window positions
  and queries are their keys plus noise, so attention is local (slash-like, as in many real heads) and a top-k
  pattern keeps the nearest diagonals; with i.i.d. keys (--synthetic-window 1) the top-k diagonals would be
  scattered over every tile distance and the tile layout nearly dense. Density and times are reported; the
  captured mass of random tensors means nothing and is not computed (null in JSON, n/a in the table).
"""

from __future__ import annotations

import argparse
import contextlib
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
    p.add_argument("--layers", default=None, help="layer indices to measure (default 0,7,15,22,29; with "
                                                  "--load-qkv: the saved ones)")
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
    source = p.add_mutually_exclusive_group()
    source.add_argument("--save-qkv", metavar="PATH", help="capture q, k, v at max(--lengths), save them, exit")
    source.add_argument("--load-qkv", metavar="PATH", help="measure q, k, v saved by --save-qkv (no model)")
    source.add_argument("--synthetic", action="store_true", help="random q, k, v with SmolLM2-135M's shapes")
    p.add_argument("--synthetic-window", type=int, default=16384, help="positions a synthetic key averages over")
    p.add_argument("--seed", type=int, default=0, help="of the synthetic tensors")
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


def save_qkv(path: str, captured: dict, meta: dict) -> None:
    """{layer: (q, k, v)} as contiguous bf16 CPU tensors (no views of larger storages), plus `meta`."""
    qkv = {layer: tuple(x.to("cpu", torch.bfloat16).contiguous().clone() for x in tensors)
           for layer, tensors in captured.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "qkv": qkv}, path)
    print(f"saved layers {sorted(qkv)} at {meta['length']} tokens to {path} "
          f"({Path(path).stat().st_size / 2**20:.1f} MiB)")


def load_qkv(path: str, lengths: list[int], layers: list[int] | None, dtype, device):
    """(meta, {layer: (q, k, v)} on `device` in `dtype`) saved by `save_qkv`."""
    saved = torch.load(path, map_location="cpu")
    meta, qkv = saved["meta"], saved["qkv"]
    if max(lengths) > meta["length"]:
        raise SystemExit(f"--lengths up to {meta['length']} for {path} (the captured length)")
    layers = sorted(qkv) if layers is None else layers
    missing = sorted(set(layers) - set(qkv))
    if missing:
        raise SystemExit(f"{path} has layers {sorted(qkv)}, not {missing}")
    return meta, {layer: tuple(x.to(device=device, dtype=dtype) for x in qkv[layer]) for layer in layers}


SMOLLM2_SHAPE = {"heads": 9, "kv_heads": 3, "head_dim": 64}


def synthetic_qkv(n: int, window: int, seed: int, dtype, device):
    """q [1, 9, n, 64], k, v [1, 3, n, 64]: keys are unit-variance moving averages of white noise over `window`
    positions (nearby keys correlate, so attention is local), queries their key plus noise, values white noise."""
    from reasonrl.kernels.pattern import repeat_kv

    h, hk, d = SMOLLM2_SHAPE["heads"], SMOLLM2_SHAPE["kv_heads"], SMOLLM2_SHAPE["head_dim"]
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(1, hk, n + window, d, generator=generator, device=device)
    sums = noise.cumsum(dim=2)
    k = (sums[:, :, window:] - sums[:, :, :-window]) / window**0.5
    q = repeat_kv(k, h) + 0.5 * torch.randn(1, h, n, d, generator=generator, device=device)
    v = torch.randn(1, hk, n, d, generator=generator, device=device)
    return tuple(x.to(dtype).contiguous() for x in (q, k, v))


def captured_mass(q, k, pattern, scale: float, rows_per_chunk: int = 1024) -> torch.Tensor:
    """[H]: mean over query rows of the dense causal softmax mass on kept keys."""
    from reasonrl.kernels.pattern import pattern_mask, repeat_kv

    k = repeat_kv(k, q.shape[1]).float()
    n = q.shape[2]
    total = torch.zeros(q.shape[1], device=q.device)
    for start in range(0, n, rows_per_chunk):
        end = min(start + rows_per_chunk, n)
        q_pos = torch.arange(start, end, device=q.device)
        logits = torch.matmul(q[0, :, start:end].float(), k[0].transpose(-1, -2)) * scale
        causal = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        total += (probs * pattern_mask(pattern, q_pos=q_pos)[0]).sum(dim=(-1, -2))
    return total / n


def layout_density(layout) -> float:
    """Kept (query, key) pairs / causal pairs of what the kernels compute, counted from the block layout (no
    [N, N] mask): per query block, its full off-diagonal tiles, its causal diagonal tile and its bar columns."""
    n, g = layout.seq_len, layout.block_size
    counts = layout.block_count.long()
    rows = (n - torch.arange(counts.shape[-1], device=counts.device) * g).clamp(max=g)  # query rows per block
    kept = (counts - 1) * g * rows + rows * (rows + 1) // 2 + layout.column_count.long() * rows
    return float(kept.sum()) / (counts.shape[0] * counts.shape[1] * n * (n + 1) / 2)


def pattern_density_and_mass(q, k, config, with_mass: bool = True):
    """(density, captured mass [H] or None) of the pattern estimated from q, k."""
    from reasonrl.kernels.layout import build_block_layout
    from reasonrl.kernels.pattern import estimate_pattern

    scale = q.shape[-1] ** -0.5
    pattern = estimate_pattern(q, k, config, scale)
    density = layout_density(build_block_layout(pattern))
    return density, captured_mass(q, k, pattern, scale) if with_mass else None


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
        with fused_sdpa_only(q.is_cuda):
            out = dense_causal_attention(q, k, v) if impl == "dense" else sparse_attention(q, k, v, sparse)
            torch.autograd.grad(out, (q, k, v), grad)
        if q.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def fused_sdpa_only(cuda: bool):
    """On CUDA, SDPA may use the flash / memory-efficient / cuDNN kernels but not the O(N^2)-memory math fallback
    (an error instead of a silently different, or out-of-memory, baseline). Nothing changes on CPU."""
    if not cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def main():
    args = parse_args()
    from reasonrl.kernels.pattern import PatternConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    impls = (args.impls or ("dense,triton" if device.type == "cuda" else "dense,reference")).split(",")
    lengths = [int(x) for x in args.lengths.split(",")]
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    config = PatternConfig(block_size=args.block_size, last_q=args.last_q, mode=args.mode, mass=args.mass,
                           vertical_size=args.vertical_size, slash_size=args.slash_size,
                           sink=min(30, args.vertical_size), local_window=min(100, args.slash_size))
    model = args.model
    if args.synthetic:
        model, layers, captured = "synthetic", [], None
    elif args.load_qkv:
        meta, captured = load_qkv(args.load_qkv, lengths, layers, getattr(torch, dtype), device)
        model, layers = meta["model"], sorted(captured)
    else:
        layers = layers or [0, 7, 15, 22, 29]
        captured = capture_qkv(args.model, args.data, max(lengths), layers, dtype, device)
        if args.save_qkv:
            meta = {"model": args.model, "data": args.data, "length": max(lengths), "layers": layers,
                    "capture_dtype": dtype}
            save_qkv(args.save_qkv, captured, meta)
            return
    rows = []
    for n in lengths:
        if args.synthetic:  # one tensor set per length, no mass
            q, k, v = synthetic_qkv(n, args.synthetic_window, args.seed, getattr(torch, dtype), device)
            densities, masses = [pattern_density_and_mass(q, k, config, with_mass=False)[0]], None
        else:
            densities, masses = [], []
            for layer in layers:
                q, k, _ = (x[:, :, :n] for x in captured[layer])
                density, mass = pattern_density_and_mass(q, k, config)
                densities.append(density)
                masses.append(mass)
            masses = torch.cat(masses)
            q, k, v = (x[:, :, :n].contiguous() for x in captured[layers[len(layers) // 2]])
        times = {impl: time_impl(impl, q, k, v, config, args.repeats) for impl in impls}
        row = {"length": n, "density": statistics.mean(densities),
               "mass_mean": None if masses is None else float(masses.mean()),
               "mass_min": None if masses is None else float(masses.min()),
               **{f"{impl}_s": t for impl, t in times.items()}}
        for impl in impls:
            if impl != "dense" and "dense" in times:
                row[f"speedup_{impl}"] = times["dense"] / times[impl]
        rows.append(row)
        print(format_row(row, impls), flush=True)
    summary = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": dtype,
               "model": model, "layers": layers, "pattern": vars(config), "rows": rows}
    if args.load_qkv:
        summary["qkv_file"] = args.load_qkv
    if args.synthetic:
        summary["synthetic"] = {**SMOLLM2_SHAPE, "window": args.synthetic_window, "seed": args.seed}
    if args.json:
        print(json.dumps(summary))


def format_row(row: dict, impls: list[str]) -> str:
    mass = "mass n/a" if row["mass_mean"] is None else f"mass mean={row['mass_mean']:.4f} min={row['mass_min']:.4f}"
    parts = [f"N={row['length']:>6}", f"density={row['density']:.3f}", mass]
    parts += [f"{impl}={row[f'{impl}_s'] * 1e3:.1f} ms" for impl in impls]
    parts += [f"speedup[{impl}]={row[f'speedup_{impl}']:.2f}x" for impl in impls if f"speedup_{impl}" in row]
    return "  ".join(parts)


if __name__ == "__main__":
    main()
