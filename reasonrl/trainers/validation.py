"""Recipe checks that relate several keys or need the process count; all run before any model is loaded.

Single-key ranges and choices live in the schema (reasonrl/config.py) and are checked by `load_config`.
"""

from __future__ import annotations

from reasonrl.config import ConfigError, RecipeConfig
from reasonrl.rewards.combine import resolve_reward
from reasonrl.rl.shapers import build_shaper


def validate(config: RecipeConfig, world_size: int) -> None:
    """Checks that need the process count or relate several keys; all before any model is loaded."""
    r = config.rollout
    sp = config.model.sparse_attention.sequence_parallel
    if sp < 1 or world_size % sp:
        raise ConfigError(f"model.sparse_attention.sequence_parallel={sp} must divide the number of processes "
                          f"({world_size})")
    if sp > 1:
        _validate_sequence_parallel(config)
        world_size //= sp  # data-parallel groups: each splits its sequences over sp ranks
    if r.group_size < 2:
        raise ConfigError(f"rollout.group_size={r.group_size}: GRPO needs at least 2 samples per prompt")
    if r.prompts_per_step < 1 or r.prompts_per_step % world_size:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} must be a positive multiple of the "
            f"number of processes ({world_size})"
        )
    if r.max_new_tokens < 1 or config.trainer.eval_max_new_tokens < 1:
        raise ConfigError("rollout.max_new_tokens and trainer.eval_max_new_tokens must be >= 1")
    if r.is_cap < 1 or not 0 <= r.is_floor <= 1:
        raise ConfigError(f"rollout.is_cap={r.is_cap} must be >= 1 and rollout.is_floor={r.is_floor} in [0, 1]")
    if r.sync_check_every < 0 or (r.sync_check_tol is not None and not r.sync_check_tol > 0):
        raise ConfigError(f"rollout.sync_check_every={r.sync_check_every} must be >= 0 and rollout.sync_check_tol="
                          f"{r.sync_check_tol} positive (or null)")
    if r.server_timeout_s <= 0:
        raise ConfigError(f"rollout.server_timeout_s={r.server_timeout_s} must be positive")
    if r.vllm_max_num_seqs is not None and r.vllm_max_num_seqs < 1:
        raise ConfigError(f"rollout.vllm_max_num_seqs={r.vllm_max_num_seqs} must be >= 1 (or null)")
    if r.vllm_block_size is not None and (r.vllm_block_size < 1 or r.vllm_block_size % 16):
        raise ConfigError(f"rollout.vllm_block_size={r.vllm_block_size} must be a positive multiple of 16 (on CPU "
                          "of 32, vLLM's CPU attention needs it), or null for the engine's default")
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature={r.temperature}: sampling for training needs a temperature > 0")
    if config.optim.micro_batch_size < 1 or config.algorithm.num_iterations < 1 or config.trainer.steps < 1:
        raise ConfigError("optim.micro_batch_size, algorithm.num_iterations and trainer.steps must be >= 1")
    if config.optim.micro_batch_tokens is not None and config.optim.micro_batch_tokens < 1:
        raise ConfigError(f"optim.micro_batch_tokens={config.optim.micro_batch_tokens} must be >= 1 (or null: "
                          "micro-batches of optim.micro_batch_size rows)")
    if not config.rewards:
        raise ConfigError("rewards: at least one reward function is needed")
    build_reward_shapers(config)  # unknown shapers or arguments fail here, before any model is loaded
    for spec in config.rewards:
        try:
            resolve_reward(spec.name)
        except ValueError as err:
            raise ConfigError(f"rewards: {err}") from err
    validate_algorithm(config)
    validate_lora(config.model.lora)


def validate_algorithm(config: RecipeConfig) -> None:
    a, r = config.algorithm, config.rollout
    if a.eps_low < 0 or a.eps_high < 0:
        raise ConfigError(f"algorithm.eps_low/eps_high must be >= 0, got {a.eps_low}, {a.eps_high}")
    if a.dual_clip is not None and a.dual_clip <= 1:
        raise ConfigError(f"algorithm.dual_clip={a.dual_clip} must be > 1 (or null to turn it off)")
    if a.loss_norm_constant is not None and a.loss_norm_constant < 1:
        raise ConfigError(f"algorithm.loss_norm_constant={a.loss_norm_constant} must be >= 1")
    if a.advantage == "hapo" and a.scale_rewards == "batch":
        raise ConfigError("algorithm.advantage=hapo normalizes per group: use scale_rewards=group or none")
    if a.kl_in == "reward" and a.kl_coef <= 0:
        raise ConfigError("algorithm.kl_in=reward needs algorithm.kl_coef > 0")
    ds = a.dynamic_sampling
    names = [spec.name for spec in config.rewards]
    if ds.enabled and ds.metric != "reward" and ds.metric not in names:
        raise ConfigError(f"algorithm.dynamic_sampling.metric={ds.metric!r}: use 'reward' or one of {names}")
    if ds.max_gen_batches < 0:
        raise ConfigError("algorithm.dynamic_sampling.max_gen_batches must be >= 0 (0 = unlimited)")
    if a.overlong.penalty and not 0 < a.overlong.buffer <= r.max_new_tokens:
        raise ConfigError(f"algorithm.overlong.buffer={a.overlong.buffer} must be in (0, rollout.max_new_tokens]")
    h = a.hapo
    if not 0 <= h.temperature_tau < 1:
        raise ConfigError(f"algorithm.hapo.temperature_tau={h.temperature_tau} must be in [0, 1)")
    if not 0 < h.entropy_pivot < 1:
        raise ConfigError(f"algorithm.hapo.entropy_pivot={h.entropy_pivot} must be in (0, 1)")
    d = a.d3s
    for key in ("sample_keep_start", "token_keep_start", "keep_end", "ramp_fraction"):
        if not 0 < getattr(d, key) <= 1:
            raise ConfigError(f"algorithm.d3s.{key}={getattr(d, key)} must be in (0, 1]")
    if d.min_keep < 1:
        raise ConfigError("algorithm.d3s.min_keep must be >= 1")
    o = config.optim
    if o.schedule == "wsd" and o.warmup_steps + o.decay_steps > config.trainer.steps:
        raise ConfigError("optim.warmup_steps + optim.decay_steps must not exceed trainer.steps for schedule=wsd")
    if o.schedule == "power":
        if o.power.b > 0:
            raise ConfigError(f"optim.power.b={o.power.b} must be <= 0")
        if o.power.decay_tokens > 0 and o.power.total_tokens is None:
            raise ConfigError("optim.power.decay_tokens > 0 needs optim.power.total_tokens")


def validate_lora(spec) -> None:
    if spec.r < 1:
        raise ConfigError(f"model.lora.r={spec.r} must be >= 1")
    if spec.alpha <= 0:
        raise ConfigError(f"model.lora.alpha={spec.alpha} must be > 0")
    if not 0 <= spec.dropout < 1:
        raise ConfigError(f"model.lora.dropout={spec.dropout} must be in [0, 1)")
    if not spec.target_modules:
        raise ConfigError("model.lora.target_modules must name at least one module (or be [all-linear])")


def build_reward_shapers(config: RecipeConfig) -> list:
    """algorithm.reward_shapers in order; `algorithm.overlong.penalty` (the DAPO switch) puts an overlong shaper
    first unless the list has one."""
    a = config.algorithm
    specs = [(spec.name, dict(spec.args)) for spec in a.reward_shapers]
    if a.overlong.penalty and not any(name == "overlong" for name, _ in specs):
        specs.insert(0, ("overlong", {"buffer": a.overlong.buffer, "factor": a.overlong.factor}))
    try:
        return [build_shaper(name, args) for name, args in specs]
    except ValueError as err:
        raise ConfigError(f"algorithm.reward_shapers: {err}") from err


def _validate_sequence_parallel(config: RecipeConfig) -> None:
    o = config.optim
    if config.model.attn_implementation != "reasonrl_sparse":
        raise ConfigError("model.sparse_attention.sequence_parallel > 1 needs model.attn_implementation=reasonrl_sparse "
                          "(the ring attention runs inside it)")
    if o.micro_batch_size != 1 or o.micro_batch_tokens is not None or o.packing:
        raise ConfigError("model.sparse_attention.sequence_parallel > 1 trains one sequence per micro-batch: set "
                          "optim.micro_batch_size=1, optim.micro_batch_tokens=null, optim.packing=false")
