"""Typed recipe schema: dataclass defaults <- recipe YAML <- `a.b=c` command-line overrides.

Unknown keys, wrong types, values outside a field's choices and numbers outside its declared range (`bounded`:
every int/float key has one, tests/config/test_schema_ranges.py checks it) fail in `load_config`, before any
compute, with a message that names the key and what is allowed. Rules that relate several keys or need the process
count live in reasonrl/trainers/validation.py.
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
    """The values a numeric key may take: finite numbers between low and high (None: unbounded on that side); open
    ends exclude the bound itself. NaN and +-inf are in no range (a switch that turns a term off is null or 0)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def __str__(self) -> str:
        low = "-inf" if self.low is None else _number(self.low)
        high = "inf" if self.high is None else _number(self.high)
        opening = "(" if self.low_open or self.low is None else "["
        closing = ")" if self.high_open or self.high is None else "]"
        return f"{opening}{low}, {high}{closing}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


def bounded(default, low=None, high=None, *, low_open=False, high_open=False, doc=""):
    """A numeric field restricted to a range (checked by `_validate_fields` in `load_config`); None, where the
    field's type allows it, is always accepted (it means "off" or "the default")."""
    return field(default=default, metadata={"range": Range(low, high, low_open, high_open), "doc": doc})


@dataclass
class LoraConfig:
    """LoRA adapters (peft): only they train and are checkpointed; the KL reference is the base model."""

    enabled: bool = False
    r: int = bounded(16, 1, doc="rank")
    alpha: int = bounded(32, 1, doc="the update is scaled by alpha / r")
    dropout: float = bounded(0.0, 0, 1, high_open=True, doc="dropout on the adapters' input")
    # module names (suffixes) that get adapters; [all-linear]: every linear layer but the LM head
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class SparseAttentionSettings:
    """Dynamic sparse attention (MTraining vertical-slash; docs/sparse_attention.md), used when
    model.attn_implementation=reasonrl_sparse. Sequences shorter than dense_below run ordinary dense attention."""

    impl: str = choice("auto", ["auto", "reference", "triton", "dense"], "auto: triton on CUDA, reference on CPU")
    dense_below: int = bounded(4096, 0, doc="sequences shorter than this run dense attention (0: none do)")
    blockwise_above: int = bounded(
        2048, 0, doc="the reference computes only the kept keys per query block beyond this length")
    block_size: int = bounded(128, 1, doc="tile size G of the block-sparse layout (triton: a power of two >= 16)")
    last_q: int = bounded(64, 1, doc="queries that score the keys")
    mode: str = choice("topk", ["topk", "mass"])
    vertical_size: int = bounded(1000, 0, doc="topk: columns kept per head (sink columns forced in)")
    slash_size: int = bounded(6096, 0, doc="topk: diagonals kept per head (the local window forced in)")
    sink: int = bounded(30, 0, doc="topk: first columns always kept (at most vertical_size)")
    local_window: int = bounded(100, 0, doc="topk: nearest diagonals always kept (at most slash_size)")
    mass: float = bounded(
        0.9, 0, 1, low_open=True, doc="mass: keep the fewest columns / diagonals holding this share of the scores")
    max_vertical: int = bounded(4096, 1, doc="mass: at most this many columns per head")
    max_slash: int = bounded(4096, 1, doc="mass: at most this many diagonals per head")
    normalize: str = choice("softmax", ["softmax", "logits"], "score probabilities, or raw logits (released code)")
    sequence_parallel: int = bounded(
        1, 1, doc="ranks one sequence is split across (striped sparse ring attention); 1 = no sequence parallelism")
    ring: str = choice("stripe", ["stripe", "hierarchical"], "flat ring, or intra-node ring inside an inter-node ring")
    local_world_size: int | None = bounded(None, 1, doc="hierarchical: ranks per node (null: LOCAL_WORLD_SIZE)")


@dataclass
class ModelConfig:
    name_or_path: str = "smollm2-135m-instruct"  # local HF folder, hub id, or built-in name
    dtype: str = choice("float32", ["auto", "float32", "bfloat16", "float16"],
                        "compute dtype; training keeps float32 master weights (bfloat16: bf16 autocast over them). auto: "
                        "bfloat16 where the device has fast bf16 (CUDA with bf16, a CPU with AVX512_BF16 or AMX_BF16), "
                        "else float32 (reasonrl/precision.py). float16 is refused for training (no loss scaling)")
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
    digits: int = bounded(2, 1, doc="arithmetic: digits per operand")
    operands: int = bounded(2, 2, 8, doc="arithmetic: numbers per problem (the most, with min_operands)")
    min_operands: int = bounded(0, 0, 8, doc="arithmetic: 0, or the fewest numbers per problem (2..operands): each "
                                "problem draws its count uniformly from [min_operands, operands]")
    operators: str = "+-*"
    num_train: int = bounded(2000, 0, doc="rows used for training (0: all rows of a file)")
    num_eval: int = bounded(200, 0, doc="held-out rows evaluated (0: no evaluation)")
    seed: int = bounded(0, 0, doc="seed of the arithmetic problems")
    template: str = "What is {question}? Put the final answer after '####'."
    # further fields of each file/hub row handed to the reward functions (e.g. [ref_length] for DRQA)
    extra_columns: list[str] = field(default_factory=list)


@dataclass
class RewardSpec:
    name: str = "accuracy"  # registry name or module:function
    weight: float = bounded(1.0, doc="this reward's share of the total (any finite number: < 0 penalizes, 0 logs)")
    args: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments, e.g. {mode: boxed}


@dataclass
class RolloutConfig:
    engine: str = choice("hf", ["hf", "vllm", "server"])
    group_size: int = bounded(8, 2, doc="samples per prompt (group-relative advantages need at least 2)")
    prompts_per_step: int = bounded(8, 1, doc="prompts per step, over all processes (a multiple of their number)")
    max_new_tokens: int = bounded(64, 1, doc="generation limit per completion")
    temperature: float = bounded(1.0, 0, low_open=True, doc="sampling temperature (training samples need > 0)")
    top_p: float = bounded(1.0, 0, 1, low_open=True, doc="nucleus sampling mass (1: off)")
    top_k: int = bounded(0, 0, doc="sample among the k most likely tokens (0: off)")
    stop: list[str] = field(default_factory=list)  # stop strings (kept in the completion, like EOS)
    batch_size: int = bounded(64, 1, doc="sequences generated together by the hf engine")
    # Importance-sampling correction for the engine/trainer mismatch (reasonrl/rl/importance.py);
    # null (auto): on for the vllm and server engines, off for hf (which samples with the trainer's own weights).
    is_correction: bool | None = None
    # token: w_t = pi_old/pi_rollout per token; sequence: their product over the completion; geometric: its
    # geometric mean (exp of the mean log-ratio), for every token of the completion.
    is_level: str = choice("token", ["token", "sequence", "geometric"])
    # truncate: min(w, is_cap); mask: w inside [is_floor, is_cap], else 0 (IcePop at is_level=token);
    # seq_mask: token weights truncated at is_cap, and every token of a completion 0 when its geometric-mean
    # ratio is outside [is_floor, is_cap] (a sequence-level rejection, as verl's geometric rejection sampling).
    is_mode: str = choice("truncate", ["truncate", "mask", "seq_mask"])
    is_cap: float = bounded(2.0, 1, doc="largest importance weight kept (truncate: clamped to it; mask: above it, 0)")
    is_floor: float = bounded(0.0, 0, 1, doc="is_mode=mask or seq_mask: weights below this are set to 0")
    # Asynchronous training (docs/rollout.md, "Asynchronous training"): 0 alternates generation and learning; k >= 1
    # lets the producer generate up to k policy versions ahead of the learner (engine=server), and a sample any of
    # whose tokens is more than k versions behind the learner's is dropped (counted in async/dropped) or, with
    # stale=regenerate, generated again with the newest weights.
    max_staleness: int = bounded(0, 0, 64, doc="policy versions a trained token may lag the learner (0: synchronous)")
    stale: str = choice("drop", ["drop", "regenerate"], "what happens to a sample older than max_staleness")
    # max_staleness >= 1: a weight push lands between chunks of inflight_chunk_tokens generated tokens, and the
    # sequences in progress continue with the new weights (each token records the version that sampled it); false:
    # the push waits until the batch in progress is complete (every sample has one version).
    inflight_updates: bool = False
    inflight_chunk_tokens: int = bounded(16, 1, doc="tokens generated between two points where a push may land")
    # engine=vllm: vLLM's KV-cache size, as a share of device memory (on CPU: of the NUMA node's RAM; null: 0.3 on
    # CPU, 0.5 on GPU) or in bytes (takes precedence).
    vllm_gpu_memory_utilization: float | None = bounded(None, 0, 1, low_open=True, doc="share of device memory")
    vllm_kv_cache_bytes: int | None = bounded(None, 2**20, doc="KV-cache bytes (takes precedence; at least 1 MiB)")
    # engine=vllm: torch.compile the model (vLLM's enforce_eager=False). Faster decoding, but a one-off compile at
    # start-up (about 2-3 min for SmolLM2 on 2 CPU cores): worth it for long runs (docs/rollout.md).
    vllm_compile: bool = False
    # engine=vllm: tokens per KV-cache block (null: 32 on CPU, where vLLM's 128 would keep the samples of a prompt
    # from sharing its prefix cache; vLLM's own choice on GPU).
    vllm_block_size: int | None = bounded(None, 16, doc="tokens per KV-cache block (a multiple of 16)")
    # engine=vllm: sequences decoded together (null: on CPU the step's whole rollout batch, prompts_per_step x
    # group_size, at least vLLM's CPU default of 256, so that no second wave decodes behind the first; vLLM's own
    # default on GPU).
    vllm_max_num_seqs: int | None = bounded(None, 1, doc="sequences decoded together")
    # engine=server: a `reasonrl serve` process; the trainer hosts the gloo group for weight pushes at weight_host
    # (null: the address this machine uses to reach the server).
    server_url: str = "http://127.0.0.1:8000"
    server_timeout_s: float = bounded(600.0, 1, 1e7, doc="seconds any one wait on the server may take (an HTTP "
                                      "call, one bucket of a weight push, forming the weight group): a dead or hung "
                                      "server stops the run after at most this long")
    weight_host: str | None = None
    # After every `sync_check_every`-th weight sync (0 = never), probe that the engine scores two of the step's
    # sequences like the trainer; raise if the mean |log-prob gap| exceeds sync_check_tol (null: by engine dtype).
    sync_check_every: int = bounded(1, 0, doc="probe every this many weight syncs (0: never)")
    sync_check_tol: float | None = bounded(None, 0, low_open=True, doc="largest mean |log-prob gap| accepted")


@dataclass
class DynamicSamplingConfig:
    """DAPO dynamic sampling: drop groups whose rewards are all equal and refill the batch with new prompts."""

    enabled: bool = False
    max_gen_batches: int = bounded(3, 0, doc="generation rounds per step, the first included (0 = unlimited)")
    on_shortfall: str = choice("train", ["train", "fail"], "train on the groups found, or raise")
    metric: str = "reward"  # "reward" (weighted total) or the name of one reward function, e.g. accuracy


@dataclass
class OverlongConfig:
    """DAPO soft overlong punishment, added to the reward, and masking of truncated completions."""

    penalty: bool = False
    buffer: int = bounded(
        8, 1, doc="the penalty ramps from 0 to -factor over the last `buffer` tokens of max_new_tokens")
    factor: float = bounded(1.0, 0, low_open=True, doc="the penalty of a completion that reaches max_new_tokens")
    mask_truncated: bool = False  # completions cut by max_new_tokens get no loss (their reward still counts)


@dataclass
class HapoConfig:
    """HAPO's token-level parts (algorithms.md 1); token-level group-average advantages: algorithm.advantage=hapo."""

    sign_mode: str = choice("paper", ["paper", "released_code"])
    # quantile of the log-entropies that splits low from high entropy (at 0 or 1 one side would be empty)
    entropy_pivot: float = bounded(0.8, 0, 1, low_open=True, high_open=True, doc="entropy quantile of the pivot")
    adaptive_temperature: bool = False
    # T_t = T0 (1 + tau h), h in [-1, 1]: tau < 1 keeps every temperature > 0
    temperature_tau: float = bounded(0.05, 0, 1, high_open=True, doc="adaptive temperature: T_t = T0 (1 + tau h)")
    adaptive_clip: bool = False
    clip_alpha: float = bounded(1.0, 0, doc="adaptive clip: a bound widens by up to (1 + clip_alpha)")
    redistribution: bool = False
    # A (1 + beta h) with h down to -1 (paper sign): beta > 1 would flip the advantage of low-entropy tokens
    adv_beta: float = bounded(1.0, 0, 1, doc="advantage redistribution: A (1 + adv_beta h)")
    fallback_threshold: float | None = bounded(
        5.0, 0, low_open=True, doc="|A| at which a group falls back to the GRPO advantage (null: never)")


@dataclass
class D3SConfig:
    """D3S down-sampling; a keep fraction of 1.0 turns its level off. Both levels' fractions move from their start
    to the shared keep_end over the ramp (reasonrl/trainers/prepare.py: d3s_keep_fractions)."""

    sample_keep_start: float = bounded(
        1.0, 0, 1, low_open=True, doc="fraction of rollouts kept at step 0 (maximum advantage variance)")
    sample_scope: str = choice("intra", ["intra", "cross"])
    token_keep_start: float = bounded(
        1.0, 0, 1, low_open=True, doc="fraction of tokens kept at step 0 (largest |A| x entropy)")
    token_scope: str = choice("batch", ["batch", "sequence"])
    keep_end: float = bounded(
        1.0, 0, 1, low_open=True, doc="fraction both levels keep at the end of the ramp (>= both starts)")
    schedule: str = choice("linear", ["linear", "cosine", "step"])
    ramp_fraction: float = bounded(
        0.5, 0, 1, low_open=True, doc="both fractions reach keep_end at ramp_fraction * trainer.steps")
    min_keep: int = bounded(2, 1, doc="rollouts kept at least, per group (intra) or per batch (cross)")


@dataclass
class ShaperSpec:
    """One reward shaper (reasonrl/rl/shapers.py); shapers apply in list order, each to the previous rewards."""

    name: str = choice("overlong", ["overlong", "rmt_budget", "effort"])
    args: dict[str, Any] = field(default_factory=dict)  # constructor arguments, e.g. {gamma: 0.5, weight: 0.5}


@dataclass
class RmtConfig:
    """RMT token curriculum and dual loss (algorithms.md 3.2, 3.3); the budget is the rmt_budget reward shaper."""

    curriculum: bool = False  # RL on a share of the completion tokens, moving from low to high entropy
    token_fraction: float = bounded(0.5, 0, 1, low_open=True, doc="curriculum: share of the tokens RL trains on")
    target_start: float = bounded(0.2, 0, 1, doc="entropy quantile the selection centres on at step 0 ...")
    target_end: float = bounded(0.9, 0, 1, doc="... and at the last step")
    width: float = bounded(0.15, 0, low_open=True, doc="width of the selection around the target quantile")
    rl_weight: float = bounded(1.0, 0, doc="weight of the RL loss in the dual loss")
    ntp_weight_start: float = bounded(
        0.0, 0, doc="next-token prediction on every token of the chosen completions at step 0 (0: off) ...")
    ntp_weight_end: float = bounded(0.0, 0, doc="... and at the last step")
    ntp_rows: str = choice("correct", ["correct", "all"], "completions the NTP term reads")


@dataclass
class AlgorithmConfig:
    advantage: str = choice("grpo", ["grpo", "dr_grpo", "rloo", "hapo"])
    # a guard against a zero std; above 1 it would dominate the std of rewards in [0, 1] and shrink every advantage
    std_eps: float = bounded(1e-4, 0, 1, low_open=True, doc="added to the reward std that divides the advantages")
    unbiased_std: bool = True
    scale_rewards: str = choice("group", ["group", "batch", "none"])
    loss_agg: str = choice(
        "token_mean", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm", "constant"]
    )
    loss_norm_constant: int | None = bounded(
        None, 1, doc="for seq_mean_token_sum_norm / constant; default rollout.max_new_tokens")
    eps_low: float = bounded(0.2, 0, 1, doc="the ratio is clipped below at 1 - eps_low (1: no lower clip)")
    eps_high: float = bounded(0.28, 0, doc="the ratio is clipped above at 1 + eps_high")
    dual_clip: float | None = bounded(
        None, 1, low_open=True, doc="c > 1: caps the loss of negative-advantage tokens at -A * c (null: off)")
    kl_coef: float = bounded(0.0, 0, doc="weight of the KL to the reference model (0: off, no reference loaded)")
    kl_estimator: str = choice("k3", ["k1", "k2", "k3"])
    kl_in: str = choice("loss", ["loss", "reward"])
    entropy_coef: float = bounded(0.0, doc="entropy bonus in the loss (< 0: entropy minimization)")
    num_iterations: int = bounded(1, 1, doc="optimizer steps per rollout batch")
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    hapo: HapoConfig = field(default_factory=HapoConfig)
    d3s: D3SConfig = field(default_factory=D3SConfig)
    reward_shapers: list[ShaperSpec] = field(default_factory=list)
    rmt: RmtConfig = field(default_factory=RmtConfig)


@dataclass
class PowerConfig:
    """Power scheduler (algorithms.md 6): lr = min(optim.lr, batch * a * tokens^b), from the tokens trained on."""

    a: float | None = bounded(
        None, 0, low_open=True, doc="null: solved so that the power law equals optim.lr at ref_tokens")
    b: float = bounded(-0.51, high=0, doc="exponent of the power law (<= 0: the lr does not grow)")
    ref_tokens: int = bounded(100_000, 1, doc="tokens at which the power law equals optim.lr (a = null)")
    warmup_tokens: int = bounded(0, 0, doc="linear warmup over this many tokens")
    decay_tokens: int = bounded(0, 0, doc="decay over the last decay_tokens of total_tokens (0: none)")
    total_tokens: int | None = bounded(None, 1, doc="tokens of the whole run; needed when decay_tokens > 0")
    decay: str = choice("exponential", ["exponential", "linear", "cosine"])
    final_factor: float = bounded(0.0, 0, 1, doc="the decay ends at final_factor times its start lr")


@dataclass
class OptimConfig:
    lr: float = bounded(1e-5, 0, 1, low_open=True, doc="AdamW learning rate (power schedule: its maximum)")
    weight_decay: float = bounded(0.0, 0, doc="AdamW decoupled weight decay (lr * weight_decay < 1)")
    max_grad_norm: float = bounded(1.0, 0, low_open=True, doc="gradients are clipped to this global norm")
    warmup_steps: int = bounded(0, 0, doc="linear warmup over the first warmup_steps steps")
    schedule: str = choice("constant", ["constant", "cosine", "wsd", "power"])
    decay_steps: int = bounded(0, 0, doc="wsd: the last decay_steps steps decay to final_factor")
    decay: str = choice("exponential", ["exponential", "linear", "cosine"])  # wsd decay shape
    final_factor: float = bounded(0.0, 0, 1, doc="wsd: the lr ends at final_factor * lr")
    power: PowerConfig = field(default_factory=PowerConfig)
    micro_batch_size: int = bounded(16, 1, doc="rows per forward/backward")
    # model-input tokens (prompt + completion, summed over rows when packed, rows x longest otherwise) per
    # micro-batch; when set, micro-batches are formed by this budget instead of micro_batch_size rows
    micro_batch_tokens: int | None = bounded(None, 1, doc="token budget per micro-batch (null: micro_batch_size)")
    packing: bool = False  # padding-free training forward: a micro-batch's sequences concatenated into one row


@dataclass
class TrainerConfig:
    steps: int = bounded(20, 1, doc="training steps")
    output_dir: str = "runs/default"
    save_every: int = bounded(10, 0, doc="checkpoint every this many steps (0: only at the end)")
    keep_last: int = bounded(2, 0, doc="checkpoints kept (0: all)")
    eval_every: int = bounded(10, 0, doc="evaluate every this many steps (0: only at the start and the end)")
    eval_at_start: bool = True
    eval_max_new_tokens: int = bounded(128, 1, doc="generation limit of the greedy evaluation")
    resume: str = choice("none", ["none", "auto"])
    seed: int = bounded(0, 0, 2**32 - 1, doc="seed of sampling and initialization (numpy takes 32 bits)")
    strict_rewards: bool = False
    max_failed_reward_steps: int = bounded(
        2, 1, doc="a reward that fails for every sample of a step on this many consecutive steps stops the run")
    # every collective (gradient reduction, gathers) fails after this long instead of hanging: a process that died
    # or stalls stops the whole job with an error naming the collective
    collective_timeout_s: float = bounded(1800.0, 1, 1e7, doc="seconds a collective may wait")


@dataclass
class LoggingConfig:
    wandb_mode: str = choice("offline", ["offline", "online", "disabled"])
    project: str = "reasonrl"
    sample_table_every: int = bounded(10, 1, doc="log sample completions every this many steps (and at step 1)")


@dataclass
class EnvConfig:
    """Multi-turn episodes with an environment (reasonrl/envs). source none: one completion per sample."""

    source: str = choice("none", ["none", "builtin", "python", "verifiers"],
                         "builtin: env.id names calculator or retry; python: env.id is module:Class; verifiers: "
                         "an environment of the verifiers package (its dataset and rubric replace data and rewards)")
    id: str | None = None  # the environment: a built-in name, module:Class, or a verifiers environment id
    args: dict[str, Any] = field(default_factory=dict)  # constructor / load_environment keyword arguments
    max_turns: int = bounded(4, 1, 100, doc="assistant turns per episode")
    max_turn_tokens: int | None = bounded(None, 1, doc="tokens per assistant turn (null: rollout.max_new_tokens)")
    max_episode_tokens: int = bounded(
        512, 1, doc="tokens after the prompt, the model's and the environment's (running out = finish 'length')")
    max_tool_calls: int = bounded(8, 0, 1000, doc="tool calls per episode; later calls get an error reply")
    tool_timeout_s: float = bounded(10.0, 0, 3600, low_open=True, doc="seconds a tool call may run")
    max_result_chars: int = bounded(2000, 1, doc="a longer tool result is cut to this many characters")
    tool_format: str = choice("auto", ["auto", "hermes", "text"],
                              "auto: hermes when the chat template has a <tool_call> format, else <tool>...</tool>")
    workers: int = bounded(16, 1, 1024, doc="threads running tool calls and environment turns")


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
    env: EnvConfig = field(default_factory=EnvConfig)


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
