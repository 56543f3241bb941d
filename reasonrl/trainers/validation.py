"""Recipe checks that relate several keys or need the process count; all run before any model is loaded.

Single-key ranges and choices live in the schema (reasonrl/config.py) and are checked by `load_config`; a rule lives
in one place. Every message names the keys it relates.
"""

from __future__ import annotations

import math

from reasonrl.config import ConfigError, RecipeConfig, RolloutConfig
from reasonrl.envs import BUILTIN_ENVS
from reasonrl.rewards.combine import resolve_reward
from reasonrl.rl.shapers import build_shaper


def validate(config: RecipeConfig, world_size: int) -> None:
    """Checks that need the process count or relate several keys; all before any model is loaded."""
    r = config.rollout
    sp = config.model.sparse_attention.sequence_parallel
    if world_size % sp:
        raise ConfigError(f"model.sparse_attention.sequence_parallel={sp} must divide the number of processes "
                          f"({world_size})")
    if sp > 1:
        _validate_sequence_parallel(config)
        world_size //= sp  # data-parallel groups: each splits its sequences over sp ranks
    if r.prompts_per_step % world_size:
        raise ConfigError(
            f"rollout.prompts_per_step={r.prompts_per_step} must be a positive multiple of the "
            f"number of processes ({world_size})"
        )
    if r.vllm_block_size is not None and r.vllm_block_size % 16:
        raise ConfigError(f"rollout.vllm_block_size={r.vllm_block_size} must be a positive multiple of 16 (on CPU "
                          "of 32, vLLM's CPU attention needs it), or null for the engine's default")
    if r.is_floor > 0 and r.is_mode not in ("mask", "seq_mask"):
        raise ConfigError(f"rollout.is_floor={r.is_floor} is used by rollout.is_mode=mask or seq_mask only (is_mode="
                          f"{r.is_mode} truncates at rollout.is_cap): set is_mode=mask, seq_mask or is_floor=0")
    validate_async(config)
    if config.model.dtype == "float16":
        raise ConfigError("model.dtype=float16: fp16 training needs loss scaling, which reasonrl does not do; use "
                          "bfloat16 (bf16 autocast over float32 master weights), auto or float32")
    if not config.rewards:
        raise ConfigError("rewards: at least one reward function is needed")
    build_reward_shapers(config)  # unknown shapers or arguments fail here, before any model is loaded
    for spec in config.rewards:
        try:
            resolve_reward(spec.name)
        except ValueError as err:
            raise ConfigError(f"rewards: {err}") from err
    _validate_reward_weights(config)
    validate_data(config)
    validate_algorithm(config)
    validate_optim(config)
    validate_sparse_attention(config)
    validate_lora(config.model.lora)
    validate_env(config)


def validate_async(config: RecipeConfig) -> None:
    """Asynchronous training needs an engine in its own process; its other keys mean nothing without it."""
    r = config.rollout
    if r.max_staleness == 0:
        if r.inflight_updates:
            raise ConfigError("rollout.inflight_updates=true needs rollout.max_staleness >= 1: synchronous training "
                              "never pushes weights while the engine generates")
        if r.stale != "drop":
            raise ConfigError(f"rollout.stale={r.stale} needs rollout.max_staleness >= 1: synchronous training has "
                              "no stale samples")
    elif r.engine != "server":
        raise ConfigError(
            f"rollout.max_staleness={r.max_staleness} needs rollout.engine=server (the engine in its own process, on "
            f"GPUs on its own devices), not {r.engine}: the hf engine samples with the learner's own weights, and the "
            "in-process vllm engine shares the learner's process and devices (on CPU, its cores)")
    elif config.model.sparse_attention.sequence_parallel > 1:
        raise ConfigError("rollout.max_staleness >= 1 is not supported with model.sparse_attention.sequence_parallel "
                          "> 1 (the group leader's rollouts are broadcast by a collective, which a generation thread "
                          "cannot join)")
    default_chunk = RolloutConfig().inflight_chunk_tokens
    if not r.inflight_updates and r.inflight_chunk_tokens != default_chunk:
        raise ConfigError(f"rollout.inflight_chunk_tokens={r.inflight_chunk_tokens} is used with "
                          f"rollout.inflight_updates=true only: set it, or leave it at {default_chunk}")


EPISODE_UNSUPPORTED_SHAPERS = {
    "overlong": "it measures a completion against rollout.max_new_tokens (use overlong.mask_truncated)",
    "rmt_budget": "it sets one completion's max_new_tokens; an episode's budget is env.max_episode_tokens",
    "effort": "it writes the effort into a single-turn prompt",
}


def validate_env(config: RecipeConfig) -> None:
    """The `env` section and the settings an episode cannot honour."""
    e, names = config.env, [spec.name for spec in config.rewards]
    if e.source == "none":
        if e.id is not None or e.args:
            raise ConfigError(f"env.id={e.id!r} / env.args are set but env.source=none: set env.source (builtin, "
                              "python or verifiers) or remove them")
        if "env" in names:
            raise ConfigError("rewards: 'env' is the environment's own score, but env.source=none has no environment")
        return
    if not e.id:
        raise ConfigError(f"env.source={e.source} needs env.id (builtin: one of {sorted(BUILTIN_ENVS)}; python: "
                          "module:Class; verifiers: an environment id)")
    if e.source == "builtin" and e.id not in BUILTIN_ENVS:
        raise ConfigError(f"env.id={e.id!r} is not a built-in environment; choose one of {sorted(BUILTIN_ENVS)}")
    if e.source == "verifiers" and "env" not in names:
        raise ConfigError("env.source=verifiers grades episodes with the environment's rubric: add "
                          "{name: env} to rewards")
    if e.max_turn_tokens is not None and e.max_turn_tokens > e.max_episode_tokens:
        raise ConfigError(f"env.max_turn_tokens={e.max_turn_tokens} exceeds env.max_episode_tokens="
                          f"{e.max_episode_tokens}")
    for spec in config.algorithm.reward_shapers:
        if spec.name in EPISODE_UNSUPPORTED_SHAPERS:
            raise ConfigError(f"algorithm.reward_shapers: {spec.name} does not work with episodes (env.source="
                              f"{e.source}): {EPISODE_UNSUPPORTED_SHAPERS[spec.name]}")
    if config.algorithm.overlong.penalty:
        raise ConfigError("algorithm.overlong.penalty measures a completion against rollout.max_new_tokens; with "
                          "episodes (env.source set) use overlong.mask_truncated, which episodes cut by "
                          "env.max_episode_tokens honour")
    if config.model.sparse_attention.sequence_parallel > 1:
        raise ConfigError("episodes (env.source set) are not supported with model.sparse_attention.sequence_parallel"
                          " > 1")


def needs_entropy(config: RecipeConfig) -> bool:
    """Whether a component reads the token entropies of the policy that sampled the batch: HAPO's adaptive
    temperature, adaptive clip or advantage redistribution, D3S's token level at any step (its keep fraction moves
    from token_keep_start to keep_end, see prepare.d3s_keep_fractions), or the RMT curriculum. (entropy_coef reads
    the training forward's own entropy, not these.)"""
    a = config.algorithm
    d = a.d3s
    return hapo_reads_entropy(a) or a.rmt.curriculum or d.token_keep_start < 1 or d.keep_end < 1


def hapo_reads_entropy(algorithm) -> bool:
    """Whether a HAPO part that reads token entropies is on: adaptive temperature, adaptive clip, redistribution."""
    h = algorithm.hapo
    return h.adaptive_temperature or h.adaptive_clip or h.redistribution


def _validate_reward_weights(config: RecipeConfig) -> None:
    a = config.algorithm
    shaped = bool(a.reward_shapers) or a.overlong.penalty or (a.kl_in == "reward" and a.kl_coef > 0)
    ntp = max(a.rmt.ntp_weight_start, a.rmt.ntp_weight_end) > 0
    if all(spec.weight == 0 for spec in config.rewards) and not shaped and not ntp:
        zeros = ", ".join(f"rewards[{i}].weight=0 ({spec.name})" for i, spec in enumerate(config.rewards))
        raise ConfigError(f"every reward weight is 0 ({zeros}), so every reward and advantage is 0 and nothing "
                          "trains: give one reward a non-zero weight")


def validate_data(config: RecipeConfig) -> None:
    d = config.data
    if d.source == "arithmetic" and d.num_train < 1:
        raise ConfigError(f"data.num_train={d.num_train} means 'every row of a file', but data.source=arithmetic "
                          "generates its rows: set data.num_train >= 1")
    if d.min_operands and not 2 <= d.min_operands <= d.operands:
        raise ConfigError(f"data.min_operands={d.min_operands} must be 0 (every problem has data.operands numbers) "
                          f"or in [2, data.operands={d.operands}]")


def validate_algorithm(config: RecipeConfig) -> None:
    a, r = config.algorithm, config.rollout
    if a.loss_norm_constant is not None and a.loss_agg not in ("seq_mean_token_sum_norm", "constant"):
        raise ConfigError(f"algorithm.loss_norm_constant={a.loss_norm_constant} is used by algorithm.loss_agg="
                          f"seq_mean_token_sum_norm or constant only (loss_agg={a.loss_agg}): set it to null")
    if a.advantage == "hapo" and a.scale_rewards == "batch":
        raise ConfigError("algorithm.advantage=hapo normalizes per group: use scale_rewards=group or none")
    if a.kl_in == "reward" and a.kl_coef <= 0:
        raise ConfigError("algorithm.kl_in=reward needs algorithm.kl_coef > 0")
    ds = a.dynamic_sampling
    names = [spec.name for spec in config.rewards]
    if ds.enabled and ds.metric != "reward" and ds.metric not in names:
        raise ConfigError(f"algorithm.dynamic_sampling.metric={ds.metric!r}: use 'reward' or one of {names}")
    if a.overlong.penalty and a.overlong.buffer > r.max_new_tokens:
        raise ConfigError(f"algorithm.overlong.buffer={a.overlong.buffer} must be in (0, rollout.max_new_tokens="
                          f"{r.max_new_tokens}]")
    _validate_d3s(config)
    _validate_rmt(config)


def _validate_d3s(config: RecipeConfig) -> None:
    d, r, steps = config.algorithm.d3s, config.rollout, config.trainer.steps
    for key, level in (("sample_keep_start", "rollout"), ("token_keep_start", "token")):
        start = getattr(d, key)
        if d.keep_end < start:
            mid_run = " (at 1.0 that level is off, so it would switch on mid-run)" if start == 1 else ""
            raise ConfigError(
                f"algorithm.d3s.keep_end={d.keep_end} is below algorithm.d3s.{key}={start}: both levels move from "
                f"their start to the shared keep_end, so the {level} keep fraction would shrink over training"
                f"{mid_run}. D3S relaxes: keep_end >= sample_keep_start and token_keep_start (all 1.0: off)")
    ramps = min(d.sample_keep_start, d.token_keep_start) < d.keep_end
    jump = math.ceil(d.ramp_fraction * steps)  # the first step with step >= ramp_fraction * steps
    if d.schedule == "step" and ramps and steps > 1 and jump > steps - 1:
        raise ConfigError(
            f"algorithm.d3s.schedule=step jumps to algorithm.d3s.keep_end at step ceil(algorithm.d3s.ramp_fraction x "
            f"trainer.steps) = {jump}, after the last step ({steps - 1}): lower ramp_fraction")
    if d.sample_keep_start < 1 or d.keep_end < 1:  # the rollout level is on at some step
        intra = d.sample_scope == "intra"
        width = r.group_size if intra else r.group_size * r.prompts_per_step
        if d.min_keep >= width:
            rows = f"rollout.group_size={r.group_size}" if intra else f"the {width} rollouts of a step"
            raise ConfigError(
                f"algorithm.d3s.min_keep={d.min_keep} is not below {rows} (sample_scope={d.sample_scope}): the "
                "rollout level would keep every rollout")


def _validate_rmt(config: RecipeConfig) -> None:
    m = config.algorithm.rmt
    if m.rl_weight == 0 and min(m.ntp_weight_start, m.ntp_weight_end) == 0:
        raise ConfigError(
            f"algorithm.rmt.rl_weight=0 leaves only the NTP term, but algorithm.rmt.ntp_weight_start="
            f"{m.ntp_weight_start} / algorithm.rmt.ntp_weight_end={m.ntp_weight_end} reach 0, so some steps would have no "
            "loss")


def validate_optim(config: RecipeConfig) -> None:
    o, steps = config.optim, config.trainer.steps
    if o.lr * o.weight_decay >= 1:
        raise ConfigError(f"optim.lr x optim.weight_decay = {o.lr} x {o.weight_decay} >= 1: AdamW's decoupled decay "
                          "(w <- w (1 - lr wd)) would zero or flip every weight")
    if o.schedule != "wsd" and o.decay_steps:
        raise ConfigError(f"optim.decay_steps={o.decay_steps} is used by optim.schedule=wsd only (schedule="
                          f"{o.schedule})")
    if o.schedule != "wsd" and o.final_factor:
        raise ConfigError(f"optim.final_factor={o.final_factor} is used by optim.schedule=wsd only (schedule="
                          f"{o.schedule}; the power schedule has optim.power.final_factor)")
    if o.schedule == "wsd" and o.warmup_steps + o.decay_steps > steps:
        raise ConfigError(f"optim.warmup_steps + optim.decay_steps ({o.warmup_steps} + {o.decay_steps}) must not "
                          f"exceed trainer.steps ({steps}) for schedule=wsd")
    if o.schedule in ("constant", "cosine") and o.warmup_steps > steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} exceeds trainer.steps={steps}: the lr would never "
                          "reach optim.lr")
    if o.schedule == "power":
        p = o.power
        if o.warmup_steps:
            raise ConfigError(f"optim.warmup_steps={o.warmup_steps} is not used by optim.schedule=power: it warms up "
                              "over optim.power.warmup_tokens")
        if p.decay_tokens > 0 and p.total_tokens is None:
            raise ConfigError("optim.power.decay_tokens > 0 needs optim.power.total_tokens")
        if p.decay_tokens > 0 and p.total_tokens - p.decay_tokens < p.warmup_tokens:
            raise ConfigError(
                f"optim.power.decay_tokens={p.decay_tokens} overlaps the warmup: optim.power.total_tokens - "
                f"decay_tokens ({p.total_tokens} - {p.decay_tokens}) < optim.power.warmup_tokens ({p.warmup_tokens})")


def validate_sparse_attention(config: RecipeConfig) -> None:
    s = config.model.sparse_attention
    if config.model.attn_implementation != "reasonrl_sparse":
        return
    g = s.block_size
    if s.impl == "triton" and (g < 16 or g & (g - 1)):
        raise ConfigError(f"model.sparse_attention.block_size={g}: impl=triton needs a power of two >= 16")
    if s.mode == "topk" and s.sink > s.vertical_size:
        raise ConfigError(f"model.sparse_attention.sink={s.sink} exceeds model.sparse_attention.vertical_size="
                          f"{s.vertical_size}: the forced sink columns would not all be kept")
    if s.mode == "topk" and s.local_window > s.slash_size:
        raise ConfigError(f"model.sparse_attention.local_window={s.local_window} exceeds "
                          f"model.sparse_attention.slash_size={s.slash_size}: the forced local diagonals would not "
                          "all be kept")
    lws = s.local_world_size
    if s.ring == "hierarchical" and lws is not None and s.sequence_parallel > 1 and s.sequence_parallel % lws:
        raise ConfigError(f"model.sparse_attention.local_world_size={lws} must divide "
                          f"model.sparse_attention.sequence_parallel={s.sequence_parallel}")


def validate_lora(spec) -> None:
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
