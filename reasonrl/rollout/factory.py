"""Build the configured rollout engine for a policy model."""

from __future__ import annotations

from pathlib import Path


def generation_config_of(model_path: str | Path):
    """A model folder's generation config without loading its weights (None without generation_config.json)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:
        return None


def eos_token_ids(tokenizer, model) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (chat models often have several). ``model``: the
    loaded model, or its folder."""
    config = (generation_config_of(model) if isinstance(model, (str, Path))
              else getattr(model, "generation_config", None))
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def build_engine(rollout_cfg, *, model, tokenizer, model_path: str, model_dtype: str, seed: int, cyclic_reflex=None):
    """`hf` generates with the policy itself; `vllm` runs vLLM in this process and receives weight syncs;
    `server` talks to a `reasonrl serve` process over HTTP and pushes weights over gloo.

    ``rollout_cfg``: a `RolloutConfig`. ``model``: the loaded policy (hf needs it; vllm and server take None, then
    their EOS ids come from ``model_path``'s generation config). ``cyclic_reflex``: vllm only, CyclicReflex settings
    applied to every request (hf takes its processor per call)."""
    if rollout_cfg.engine != "hf" and model is None:
        model = model_path
    if cyclic_reflex is not None and rollout_cfg.engine != "vllm":
        raise ValueError(f"cyclic_reflex is set at start-up for the vllm engine only, not {rollout_cfg.engine!r}")
    if rollout_cfg.engine == "hf":
        from reasonrl.rollout.hf import HFEngine

        return HFEngine(
            model,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_ids=eos_token_ids(tokenizer, model),
            batch_size=rollout_cfg.batch_size,
            tokenizer=tokenizer,
        )
    if rollout_cfg.engine == "vllm":
        from reasonrl.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, dtype=model_dtype, seed=seed, eos_token_ids=eos_token_ids(tokenizer, model),
                          gpu_memory_utilization=rollout_cfg.vllm_gpu_memory_utilization,
                          kv_cache_memory_bytes=rollout_cfg.vllm_kv_cache_bytes,
                          enforce_eager=not rollout_cfg.vllm_compile, block_size=rollout_cfg.vllm_block_size,
                          max_num_seqs=rollout_cfg.vllm_max_num_seqs,
                          rollout_batch=rollout_cfg.prompts_per_step * rollout_cfg.group_size,
                          cyclic_reflex=cyclic_reflex)
    if rollout_cfg.engine == "server":
        from reasonrl.rollout.server_auth import client_secrets
        from reasonrl.rollout.server_engine import ServerEngine

        # the server's secrets stay out of recipes and logged configs: REASONRL_WEIGHT_TOKEN(_FILE), REASONRL_API_KEY
        return ServerEngine(rollout_cfg.server_url, eos_token_ids=eos_token_ids(tokenizer, model), tokenizer=tokenizer,
                            timeout_s=rollout_cfg.server_timeout_s, weight_host=rollout_cfg.weight_host,
                            chunk_tokens=rollout_cfg.inflight_chunk_tokens if rollout_cfg.inflight_updates else None,
                            **client_secrets())
    raise ValueError(f"unknown rollout.engine {rollout_cfg.engine!r}")
