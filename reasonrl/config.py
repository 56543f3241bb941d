"""Typed recipe schema: dataclass defaults <- recipe YAML <- `a.b=c` command-line overrides.

Unknown keys, wrong types and values outside a field's choices fail in `load_config`, before any compute,
with a message that names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


def choice(default, choices, doc=""):
    """A field restricted to `choices` (checked by `_validate_fields` in `load_config`)."""
    return field(default=default, metadata={"choices": tuple(choices), "doc": doc})


@dataclass(frozen=True)
class Range:
    """The values a numeric key may take: low/high None = unbounded; open ends exclude the bound itself."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if math.isnan(value):  # NaN is in no range
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        opening = "(" if self.low_open or self.low is None else "["
        closing = ")" if self.high_open or self.high is None else "]"
        return f"{opening}{low}, {high}{closing}"


def bounded(default, low=None, high=None, *, low_open=False, high_open=False, doc=""):
    """A numeric field restricted to a range (checked by `_validate_fields` in `load_config`); None, where the
    field's type allows it, is always accepted (it means "off" or "the default")."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open), "doc": doc})


@dataclass
class LoraConfig:
    """LoRA adapters (peft): only they train and are checkpointed; the KL reference is the base model."""

    enabled: bool = False
    r: int = 16  # rank
    alpha: int = 32  # the update is scaled by alpha / r
    dropout: float = 0.0
    # module names (suffixes) that get adapters; [all-linear]: every linear layer but the LM head
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class SparseAttentionSettings:
    """Dynamic sparse attention (MTraining vertical-slash; docs/sparse_attention.md), used when
    model.attn_implementation=reasonrl_sparse. Sequences shorter than dense_below run ordinary dense attention."""

    impl: str = choice("auto", ["auto", "reference", "triton", "dense"], "auto: triton on CUDA, reference on CPU")
    dense_below: int = 4096
    blockwise_above: int = 2048  # the reference computes only the kept keys per query block beyond this length
    block_size: int = 128  # tile size G of the block-sparse layout
    last_q: int = 64  # queries that score the keys
    mode: str = choice("topk", ["topk", "mass"])
    vertical_size: int = 1000  # topk: columns kept per head (sink columns forced in)
    slash_size: int = 6096  # topk: diagonals kept per head (the local window forced in)
    sink: int = 30
    local_window: int = 100
    mass: float = 0.9  # mass: keep the fewest columns / diagonals holding this share of the scores
    max_vertical: int = 4096
    max_slash: int = 4096
    normalize: str = choice("softmax", ["softmax", "logits"], "score probabilities, or raw logits (released code)")
    # ranks one sequence is split across (striped sparse ring attention); 1 = no sequence parallelism
    sequence_parallel: int = 1
    ring: str = choice("stripe", ["stripe", "hierarchical"], "flat ring, or intra-node ring inside an inter-node ring")
    local_world_size: int | None = None  # hierarchical: ranks per node (null: LOCAL_WORLD_SIZE)


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"  # local HF folder, hub id, or built-in name
    dtype: str = choice("float32", ["float32", "bfloat16", "float16"])
    attn_implementation: str | None = None  # as in transformers ("sdpa", "eager", ...), or "reasonrl_sparse"
    sparse_attention: SparseAttentionSettings = field(default_factory=SparseAttentionSettings)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # recompute each decoder layer's activations in backward (less memory, more compute). Transformers drops the KV
    # cache under it, so the padded forward runs whole sequences instead of sharing each prompt's cache
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    source: str = choice("arithmetic", ["arithmetic", "jsonl", "parquet", "hub"])
    path: str | None = None  # file for jsonl/parquet; dataset name for hub (as in datasets.load_dataset)
    eval_path: str | None = None  # held-out file; without it the last num_eval rows of `path` are held out
    hub_config: str | None = None  # dataset config name for hub sources (e.g. "main" for gsm8k)
    train_split: str = "train"
    eval_split: str = "test"
    question_key: str = "question"
    answer_key: str = "answer"
    answer_mode: str = choice("hash", ["hash", "raw"])
    digits: int = 2
    operators: str = "+-*"
    num_train: int = 2000  # rows used for training (<= 0: all rows of a file)
    num_eval: int = 200
    seed: int = 0
    template: str = "What is {question}? Put the final answer after '####'."
    # further fields of each file/hub row handed to the reward functions (e.g. [ref_length] for DRQA)
    extra_columns: list[str] = field(default_factory=list)


@dataclass
class RewardSpec:
    name: str = "accuracy"  # registry name or module:function
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments, e.g. {mode: boxed}


@dataclass
class RolloutConfig:
    engine: str = choice("hf", ["hf", "vllm", "server"])
    group_size: int = 8
    prompts_per_step: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)  # stop strings (kept in the completion, like EOS)
    batch_size: int = 64  # sequences generated together by the hf engine
    # Importance-sampling correction for the engine/trainer mismatch (reasonrl/rl/importance.py);
    # null (auto): on for the vllm and server engines, off for hf (which samples with the trainer's own weights).
    is_correction: bool | None = None
    is_level: str = choice("token", ["token", "sequence"])
    is_mode: str = choice("truncate", ["truncate", "mask"])
    is_cap: float = 2.0
    is_floor: float = 0.0
    # engine=vllm: vLLM's KV-cache size, as a share of device memory (on CPU: of the NUMA node's RAM; null: 0.3 on
    # CPU, 0.5 on GPU) or in bytes (takes precedence).
    vllm_gpu_memory_utilization: float | None = None
    vllm_kv_cache_bytes: int | None = None
    # engine=vllm: torch.compile the model (vLLM's enforce_eager=False). Faster decoding, but a one-off compile at
    # start-up (about 2-3 min for SmolLM2 on 2 CPU cores): worth it for long runs (docs/rollout.md).
    vllm_compile: bool = False
    # engine=vllm: tokens per KV-cache block (null: 32 on CPU, where vLLM's 128 would keep the samples of a prompt
    # from sharing its prefix cache; vLLM's own choice on GPU).
    vllm_block_size: int | None = None
    # engine=vllm: sequences decoded together (null: on CPU the step's whole rollout batch, prompts_per_step x
    # group_size, at least vLLM's CPU default of 256, so that no second wave decodes behind the first; vLLM's own
    # default on GPU).
    vllm_max_num_seqs: int | None = None
    # engine=server: a `reasonrl serve` process; the trainer hosts the gloo group for weight pushes at weight_host
    # (null: the address this machine uses to reach the server).
    server_url: str = "http://127.0.0.1:8000"
    server_timeout_s: float = 600.0
    weight_host: str | None = None
    # After every `sync_check_every`-th weight sync (0 = never), probe that the engine scores two of the step's
    # sequences like the trainer; raise if the mean |log-prob gap| exceeds sync_check_tol (null: by engine dtype).
    sync_check_every: int = 1
    sync_check_tol: float | None = None


@dataclass
class DynamicSamplingConfig:
    """DAPO dynamic sampling: drop groups whose rewards are all equal and refill the batch with new prompts."""

    enabled: bool = False
    max_gen_batches: int = 3  # generation rounds per step, the first included (0 = unlimited)
    on_shortfall: str = choice("train", ["train", "fail"], "train on the groups found, or raise")
    metric: str = "reward"  # "reward" (weighted total) or the name of one reward function, e.g. accuracy


@dataclass
class OverlongConfig:
    """DAPO soft overlong punishment, added to the reward, and masking of truncated completions."""

    penalty: bool = False
    buffer: int = 8  # the penalty ramps from 0 to -factor over the last `buffer` tokens of max_new_tokens
    factor: float = 1.0
    mask_truncated: bool = False  # completions cut by max_new_tokens get no loss (their reward still counts)


@dataclass
class HapoConfig:
    """HAPO's token-level parts (algorithms.md 1); token-level group-average advantages: algorithm.advantage=hapo."""

    sign_mode: str = choice("paper", ["paper", "released_code"])
    entropy_pivot: float = 0.8
    adaptive_temperature: bool = False
    temperature_tau: float = 0.05
    adaptive_clip: bool = False
    clip_alpha: float = 1.0
    redistribution: bool = False
    adv_beta: float = 1.0
    fallback_threshold: float = 5.0  # |A| at which a group falls back to the GRPO advantage


@dataclass
class D3SConfig:
    """D3S down-sampling; a keep fraction of 1.0 turns its level off."""

    sample_keep_start: float = 1.0  # fraction of rollouts kept at step 0 (maximum advantage variance)
    sample_scope: str = choice("intra", ["intra", "cross"])
    token_keep_start: float = 1.0  # fraction of tokens kept at step 0 (largest |A| x entropy)
    token_scope: str = choice("batch", ["batch", "sequence"])
    keep_end: float = 1.0
    schedule: str = choice("linear", ["linear", "cosine", "step"])
    ramp_fraction: float = 0.5  # both fractions reach keep_end at ramp_fraction * trainer.steps
    min_keep: int = 2


@dataclass
class ShaperSpec:
    """One reward shaper (reasonrl/rl/shapers.py); shapers apply in list order, each to the previous rewards."""

    name: str = choice("overlong", ["overlong", "rmt_budget", "effort"])
    args: dict[str, Any] = field(default_factory=dict)  # constructor arguments, e.g. {gamma: 0.5, weight: 0.5}


@dataclass
class RmtConfig:
    """RMT token curriculum and dual loss (algorithms.md 3.2, 3.3); the budget is the rmt_budget reward shaper."""

    curriculum: bool = False  # RL on a share of the completion tokens, moving from low to high entropy
    token_fraction: float = 0.5
    target_start: float = 0.2  # entropy quantile the selection centres on at step 0 ...
    target_end: float = 0.9  # ... and at the last step
    width: float = 0.15
    rl_weight: float = 1.0
    ntp_weight_start: float = 0.0  # next-token prediction on every token of the chosen completions (0: off)
    ntp_weight_end: float = 0.0
    ntp_rows: str = choice("correct", ["correct", "all"], "completions the NTP term reads")


@dataclass
class AlgorithmConfig:
    advantage: str = choice("grpo", ["grpo", "dr_grpo", "rloo", "hapo"])
    std_eps: float = 1e-4
    unbiased_std: bool = True
    scale_rewards: str = choice("group", ["group", "batch", "none"])
    loss_agg: str = choice(
        "token_mean", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "constant"]
    )
    loss_norm_constant: int | None = None  # for seq_mean_token_sum_norm / constant; default rollout.max_new_tokens
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None  # c > 1: caps the loss of negative-advantage tokens at -A * c
    kl_coef: float = 0.0
    kl_estimator: str = choice("k3", ["k1", "k2", "k3"])
    kl_in: str = choice("loss", ["loss", "reward"])
    entropy_coef: float = 0.0
    num_iterations: int = 1
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    hapo: HapoConfig = field(default_factory=HapoConfig)
    d3s: D3SConfig = field(default_factory=D3SConfig)
    reward_shapers: list[ShaperSpec] = field(default_factory=list)
    rmt: RmtConfig = field(default_factory=RmtConfig)


@dataclass
class PowerConfig:
    """Power scheduler (algorithms.md 6): lr = min(optim.lr, batch * a * tokens^b), from the tokens trained on."""

    a: float | None = None  # None: solved so that the power law equals optim.lr at ref_tokens
    b: float = -0.51
    ref_tokens: int = 100_000
    warmup_tokens: int = 0
    decay_tokens: int = 0
    total_tokens: int | None = None  # needed when decay_tokens > 0
    decay: str = choice("exponential", ["exponential", "linear", "cosine"])
    final_factor: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: str = choice("constant", ["constant", "cosine", "wsd", "power"])
    decay_steps: int = 0  # wsd: the last decay_steps steps decay to final_factor
    decay: str = choice("exponential", ["exponential", "linear", "cosine"])  # wsd decay shape
    final_factor: float = 0.0  # wsd
    power: PowerConfig = field(default_factory=PowerConfig)
    micro_batch_size: int = 16
    # model-input tokens (prompt + completion, summed over rows when packed, rows x longest otherwise) per
    # micro-batch; when set, micro-batches are formed by this budget instead of micro_batch_size rows
    micro_batch_tokens: int | None = None
    packing: bool = False  # padding-free training forward: a micro-batch's sequences concatenated into one row


@dataclass
class TrainerConfig:
    steps: int = 20
    output_dir: str = "runs/default"
    save_every: int = 10
    keep_last: int = 2
    eval_every: int = 10  # 0: evaluate only at the start and the end
    eval_at_start: bool = True
    eval_max_new_tokens: int = 128
    resume: str = choice("none", ["none", "auto"])
    seed: int = 0
    strict_rewards: bool = False
    # every collective (gradient reduction, gathers) fails after this long instead of hanging: a process that died
    # or stalls stops the whole job with an error naming the collective
    collective_timeout_s: float = 1800.0


@dataclass
class LoggingConfig:
    wandb_mode: str = choice("offline", ["offline", "online", "disabled"])
    project: str = "reasonrl"
    sample_table_every: int = 10


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec()])
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _validate_fields(obj, prefix: str = "") -> None:
    """Every field's choices and range, recursively; the message names the key, the value and what is allowed."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate_fields(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _validate_fields(item, f"{key}[{i}].")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(f.metadata['choices'])}")
        elif "range" in f.metadata and value is not None and value not in f.metadata["range"]:
            raise ConfigError(f"{key}={value!r} is out of range: it must be in {f.metadata['range']}")


def _recipe_layers(path: Path, seen: tuple[Path, ...] = ()) -> list:
    """The YAML layers of a recipe, parents first: a recipe may start from another with `base: other.yaml`
    (a path relative to the recipe's folder); its own keys then override the parent's."""
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"recipe {path} inherits from itself via 'base' ({' -> '.join(str(p) for p in seen)})")
    layer = OmegaConf.load(path)
    base = layer.pop("base", None) if isinstance(layer, DictConfig) else None
    if base is None:
        return [layer]
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path to another recipe, got {base!r}")
    return [*_recipe_layers(path.parent / base, (*seen, path)), layer]


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Merge schema, recipe YAML and `a.b=c` overrides into a validated `RecipeConfig`."""
    merged = OmegaConf.structured(RecipeConfig)
    try:
        if recipe is not None:
            for layer in _recipe_layers(Path(recipe)):
                merged = OmegaConf.merge(merged, layer)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"invalid config key '{key}': {err.msg if hasattr(err, 'msg') else err}") from err
    config = OmegaConf.to_object(merged)
    _validate_fields(config)
    return config


def save_config(config: RecipeConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
