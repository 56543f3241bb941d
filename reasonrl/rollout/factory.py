"""Build the configured rollout engine for a policy model."""

from __future__ import annotations


def eos_token_ids(tokenizer, model) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often have several)."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def build_engine(rollout_cfg, *, model, tokenizer, model_path: str, model_dtype: str, seed: int):
    """`hf` generates with the policy itself; `vllm` runs vLLM in this process and receives weight syncs."""
    if rollout_cfg.engine == "hf":
        from reasonrl.rollout.hf import HFEngine

        return HFEngine(
            model,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_ids=eos_token_ids(tokenizer, model),
            batch_size=rollout_cfg.batch_size,
        )
    if rollout_cfg.engine == "vllm":
        from reasonrl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, dtype=model_dtype, seed=seed, eos_token_ids=eos_token_ids(tokenizer, model))
    raise NotImplementedError(f"rollout.engine={rollout_cfg.engine!r} is not available yet")
