"""Activation memory of one training forward/backward: the padded shared-prompt forward (default), whole padded
sequences, the packed forward, and both under gradient checkpointing.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_memory.py                  # CPU, eager attention
    .venv/bin/python scripts/bench_memory.py --device cuda --attn sdpa          # adds the CUDA peak

A random Llama (4 layers, hidden 256, vocab 4096) scores a GRPO-like micro-batch: 4 prompts of 64-160 tokens x 8
samples with skewed completion lengths (most short, one per group at the 512-token cap). "saved" is the bytes of
the tensors autograd keeps for backward (each storage once), "attention" the part of it in [B, H, q, kv] tensors
(attention weights / masks): deterministic on any device. Times include backward and are only indicative.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from reasonrl.trainers.policy import completion_logprobs, full_sequence_completion_logprobs, packed_completion_logprobs

HEAD_DIM = 64


def saved_bytes(fn, *args, **kwargs):
    seen, attn = {}, {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        if t.dim() == 4 and t.shape[-1] != HEAD_DIM:
            attn[key] = seen[key]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return sum(seen.values()), sum(attn.values()), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attn", default="eager", help="eager, sdpa, flash_attention_2, ...")
    parser.add_argument("--max-len", type=int, default=512)
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=256 // HEAD_DIM, num_key_value_heads=2, max_position_embeddings=4096,
                      pad_token_id=0)
    cfg._attn_implementation = args.attn
    g = torch.Generator().manual_seed(0)
    p, group, t = 4, 8, args.max_len
    prompts = [torch.randint(1, 4096, (int(n),), generator=g).tolist() for n in torch.randint(64, 160, (p,), generator=g)]
    prompt_ids = [x for x in prompts for _ in range(group)]
    lengths = (torch.rand(p * group, generator=g) ** 3 * t).long().clamp(min=8)
    lengths[::group] = t
    ids = torch.randint(1, 4096, (p * group, t), generator=g).to(dev)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(dev)
    print(f"{p * group} rows, {int(mask.sum())} completion tokens ({mask.numel()} padded), "
          f"{sum(map(len, prompt_ids)) + int(mask.sum())} packed tokens, attention={args.attn}")
    runs = [("padded, shared prompt", False, completion_logprobs),
            ("padded, whole sequences", False, full_sequence_completion_logprobs),
            ("packed", False, packed_completion_logprobs),
            ("checkpointing, padded", True, completion_logprobs),
            ("checkpointing, packed", True, packed_completion_logprobs)]
    for name, checkpointing, forward in runs:
        model = LlamaForCausalLM(cfg).to(dev)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
        t0 = time.perf_counter()
        total, attn, (logp, ent) = saved_bytes(forward, model, prompt_ids, ids, mask, pad_id=0)
        ((logp + ent) * mask).sum().backward()
        peak = f", CUDA peak {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB" if dev.type == "cuda" else ""
        print(f"{name:24s} saved {total / 2**20:7.0f} MiB (attention {attn / 2**20:6.0f} MiB){peak}, "
              f"{time.perf_counter() - t0:.1f} s")
        del model, logp, ent


if __name__ == "__main__":
    main()
