"""LoRA through peft (`model.lora.enabled`): only the adapters train and are checkpointed.

The reference policy of the KL term is the same model with its adapters switched off (no second copy of the
weights), and the vllm/server engines receive the merged weights W + scale * B @ A under the plain HF names,
one tensor at a time.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

ADAPTER_DIR = "adapter"  # a checkpoint's adapter folder, in place of model/
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def is_lora_model(model) -> bool:
    """Whether `model` (or the module a DDP/DeepSpeed wrapper holds) is a peft model; does not import peft."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(getattr(model, "module", model), peft.PeftModel)


def apply_lora(model, spec):
    """Wrap a causal LM in LoRA adapters (peft), per `spec` (`reasonrl.config.LoraConfig`); the base weights are
    frozen, so only adapter parameters require grad. `target_modules: [all-linear]` selects every linear layer
    but the LM head."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(spec.target_modules)
    config = PeftLoraConfig(
        task_type="CAUSAL_LM", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
    )
    model = get_peft_model(model, config)
    if spec.dropout > 0:  # the trainer otherwise keeps the policy in eval mode, where dropout is off
        model.train()
    return model


def _unmerged_lora_layers(peft_model) -> dict[str, object]:
    """LoRA layers whose adapters are on and not merged yet, by the plain model's module name."""
    from peft.tuners.lora import LoraLayer

    return {
        name: module for name, module in peft_model.get_base_model().named_modules()
        if isinstance(module, LoraLayer) and not module.merged and not module.disable_adapters
        and any(a in module.lora_A for a in module.active_adapters)
    }


@torch.no_grad()
def merged_named_parameters(peft_model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the model with its adapters merged, named as the plain HF model's
    `named_parameters()` (what vLLM loads). The model is left untouched and one merged tensor exists at a time."""
    layers = _unmerged_lora_layers(peft_model)
    for name, param in peft_model.get_base_model().named_parameters():
        parts = name.split(".")
        if any(part in _ADAPTER_PARTS for part in parts):
            continue
        if "base_layer" not in parts:
            yield name, param.detach()
            continue
        module_name = ".".join(parts[: parts.index("base_layer")])
        plain = name.replace(".base_layer.", ".")
        layer = layers.get(module_name)
        if layer is None or parts[-1] != "weight":
            yield plain, param.detach()
            continue
        merged = param.detach().clone()
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                merged += layer.get_delta_weight(adapter).to(merged.dtype)
        yield plain, merged


@contextlib.contextmanager
def adapters_disabled(model):
    """Run `model` (a peft model, or a DDP/DeepSpeed wrapper of one) as its base model inside the block."""
    with getattr(model, "module", model).disable_adapter():
        yield


class DisabledAdapterReference:
    """The KL reference policy: the policy with its adapters off, in eval mode, called like a causal LM.

    `completion_logprobs` calls it twice (prompt pass with KV cache, completion pass); both run as the base model.
    Adapter parameters keep their `requires_grad` after each call.
    """

    training = False  # it always runs in eval mode (callers check `.training`, e.g. for gradient checkpointing)

    def __init__(self, model):
        self.model = getattr(model, "module", model)

    def __call__(self, *args, **kwargs):
        was_training = self.model.training
        self.model.eval()
        try:
            with adapters_disabled(self.model):
                return self.model(*args, **kwargs)
        finally:
            self.model.train(was_training)


def save_adapters(model, path: str | Path, state_dict: dict | None = None) -> None:
    """Write the adapters only (adapter_config.json, adapter_model.safetensors) into `path`; `state_dict` (names as
    the model's own) replaces the module's values (DeepSpeed bf16 mode: the float32 masters)."""
    getattr(model, "module", model).save_pretrained(str(path), safe_serialization=True, state_dict=state_dict)


def load_adapters(model, path: str | Path) -> None:
    """Load adapter weights saved by `save_adapters` into a model built by `apply_lora` with the same spec;
    raise if a saved tensor has no place or an adapter tensor got no value."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    model = getattr(model, "module", model)
    weights = load_peft_weights(str(path), device="cpu")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in result.missing_keys if any(part in _ADAPTER_PARTS for part in k.split("."))]
    if result.unexpected_keys or missing:
        raise ValueError(f"adapters in {path} do not match model.lora: unexpected {result.unexpected_keys[:5]}, "
                         f"missing {missing[:5]}")
