"""Typed recipe schema: dataclass defaults <- recipe YAML <- `a.b=c` command-line overrides.

Unknown keys, wrong types and values outside a field's choices fail in `load_config`, before any compute,
with a message that names the key and the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the key."""


def choice(default, choices, doc=""):
    """A field restricted to `choices` (checked by `_validate_choices` in `load_config`)."""
    return field(default=default, metadata={"choices": tuple(choices), "doc": doc})


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"  # local HF folder, hub id, or built-in name
    dtype: str = choice("float32", ["float32", "bfloat16", "float16"])
    attn_implementation: str | None = None


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
    batch_size: int = 64  # sequences generated together by the hf engine


@dataclass
class AlgorithmConfig:
    eps_low: float = 0.2
    eps_high: float = 0.28
    std_eps: float = 1e-4
    unbiased_std: bool = True
    scale_rewards: str = choice("group", ["group", "batch", "none"])
    kl_coef: float = 0.0
    num_iterations: int = 1


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    schedule: str = choice("constant", ["constant", "cosine"])
    micro_batch_size: int = 16


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


def _validate_choices(obj, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _validate_choices(value, key + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    _validate_choices(item, f"{key}[{i}].")
        elif "choices" in f.metadata and value not in f.metadata["choices"]:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(f.metadata['choices'])}")


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Merge schema, recipe YAML and `a.b=c` overrides into a validated `RecipeConfig`."""
    merged = OmegaConf.structured(RecipeConfig)
    try:
        if recipe is not None:
            if not Path(recipe).is_file():
                raise ConfigError(f"recipe file {recipe} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(recipe))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"invalid config key '{key}': {err.msg if hasattr(err, 'msg') else err}") from err
    config = OmegaConf.to_object(merged)
    _validate_choices(config)
    return config


def save_config(config: RecipeConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
