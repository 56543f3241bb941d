"""Fuzz of the schema's ranges: every numeric key at and just past each finite bound of its declared range (plus
null where the type allows it, and NaN / +-inf for floats). A value outside the range is refused by `load_config`
naming the key; a value inside either is refused by a cross-key rule of `validate` naming the key (the cases are
listed in REFUSED_BY_RULES) or loads and trains a step of recipes/tiny_smoke.yaml (small settings) with finite
metrics. Keys that only act with another key on get that key (CONTEXT), so the step is not a silent no-op; keys
that cannot act in one CPU process are checked at load only (LOAD_ONLY, with the reason)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from schema_keys import NumericKey, numeric_keys

from reasonrl.config import ConfigError, load_config
from reasonrl.trainers.validation import validate

SMOKE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_smoke.yaml"
REWARD = "fuzz_rewards:alternating"
SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4", "optim.micro_batch_size=4",
         "data.num_train=16", "data.num_eval=2", "trainer.eval_at_start=false", "trainer.eval_max_new_tokens=4",
         "logging.wandb_mode=disabled", f"rewards=[{{name: '{REWARD}'}}]"]

SPARSE = ["model.attn_implementation=reasonrl_sparse", "model.sparse_attention.impl=reference",
          "model.sparse_attention.dense_below=0", "model.sparse_attention.block_size=4",
          "model.sparse_attention.last_q=4", "model.sparse_attention.vertical_size=2",
          "model.sparse_attention.slash_size=4", "model.sparse_attention.sink=1",
          "model.sparse_attention.local_window=2"]
MASS = [*SPARSE, "model.sparse_attention.mode=mass"]
HAPO = ["algorithm.advantage=hapo", "algorithm.hapo.adaptive_temperature=true", "algorithm.hapo.adaptive_clip=true",
        "algorithm.hapo.redistribution=true"]
# The keys that switch a fuzzed key's component on (the longest matching prefix applies).
CONTEXT = {
    "model.lora.": ["model.lora.enabled=true"],
    "model.sparse_attention.": SPARSE,
    "model.sparse_attention.mass": MASS,
    "model.sparse_attention.max_vertical": MASS,
    "model.sparse_attention.max_slash": MASS,
    "rollout.is_": ["rollout.is_correction=true", "rollout.is_mode=mask"],
    "algorithm.loss_norm_constant": ["algorithm.loss_agg=constant"],
    "algorithm.dynamic_sampling.": ["algorithm.dynamic_sampling.enabled=true"],
    "algorithm.overlong.": ["algorithm.overlong.penalty=true", "algorithm.overlong.buffer=2"],
    "algorithm.hapo.": HAPO,
    "algorithm.d3s.": ["rollout.group_size=4", "algorithm.d3s.sample_keep_start=0.5",
                       "algorithm.d3s.token_keep_start=0.5"],
    "algorithm.rmt.": ["algorithm.rmt.curriculum=true", "algorithm.rmt.ntp_weight_start=0.5",
                       "algorithm.rmt.ntp_weight_end=0.1"],
    "optim.power.": ["optim.schedule=power"],
    "rollout.max_staleness": ["rollout.engine=server"],
    "rollout.inflight_chunk_tokens": ["rollout.engine=server", "rollout.max_staleness=1",
                                      "rollout.inflight_updates=true"],
    "optim.decay_steps": ["optim.schedule=wsd"],
    "data.min_operands": ["data.operands=8"],  # every count in [2, 8] is then a valid fewest
    "optim.final_factor": ["optim.schedule=wsd", "optim.decay_steps=2"],
}
# What a step's metrics show when the CONTEXT's component acted (the fuzzed value is not a silent no-op).
EVIDENCE = {
    "model.lora.": lambda m, t: any("lora_" in name for name, _ in t.policy.named_parameters()),
    "model.sparse_attention.": lambda m, t: t.policy.config._attn_implementation == "reasonrl_sparse",
    "rollout.is_": lambda m, t: "sampling/is_ratio_mean" in m,
    "algorithm.dynamic_sampling.": lambda m, t: "dynamic/gen_rounds" in m,
    "algorithm.overlong.": lambda m, t: "reward/overlong_penalty" in m,
    "algorithm.hapo.": lambda m, t: "hapo/adv_changed_frac" in m and "hapo/temperature_mean" in m,
    "algorithm.d3s.": lambda m, t: min(m["d3s/sample_keep_frac"], m["d3s/token_keep_frac"]) < 1,
    "algorithm.rmt.": lambda m, t: "rmt/ntp_weight" in m or m["train/loss_tokens"] < _completion_tokens(m, t),
}
STEPS = {"algorithm.hapo.": 2}  # HAPO's adaptive temperature samples with the previous step's statistics
RUN = ("trainer.", "data.num_eval")  # the whole loop (evaluation, checkpoints), 2 steps: trainer.run()
LOAD_ONLY = {
    "model.sparse_attention.sequence_parallel": "values > 1 split each sequence over several processes "
                                                "(tests/trainers/test_sequence_parallel.py)",
    "model.sparse_attention.local_world_size": "the hierarchical ring runs over several processes",
    "rollout.vllm_gpu_memory_utilization": "engine=vllm only",
    "rollout.vllm_kv_cache_bytes": "engine=vllm only",
    "rollout.vllm_block_size": "engine=vllm only",
    "rollout.vllm_max_num_seqs": "engine=vllm only",
    "rollout.server_timeout_s": "engine=server only (a `reasonrl serve` process)",
    "rollout.max_staleness": "asynchronous training needs a `reasonrl serve` process (tests/trainers/test_async.py)",
    "rollout.inflight_chunk_tokens": "asynchronous training needs a `reasonrl serve` process "
                                     "(tests/trainers/test_async.py)",
    "rollout.sync_check_every": "the weight-sync probe of the vllm / server engines (hf shares the trainer's weights)",
    "rollout.sync_check_tol": "the weight-sync probe of the vllm / server engines (hf shares the trainer's weights)",
}
# In-range values (in their CONTEXT) that a cross-key rule of `validate` refuses.
REFUSED_BY_RULES = {
    ("data.num_train", 0),  # 0 means "every row of a file"; the arithmetic source generates rows
    ("data.min_operands", 1),  # a problem has at least two numbers (0: always data.operands)
    ("algorithm.d3s.keep_end", 1e-06),  # below the context's starts (0.5): the fractions would shrink
    ("model.sparse_attention.vertical_size", 0),  # below sink=1
    ("model.sparse_attention.slash_size", 0),  # below local_window=2
    ("rewards[0].weight", 0.0),  # the only reward: nothing would train
}
# Further in-range values: keys without a finite bound on a side, and keys whose bound is their (off) default.
EXTRA = {"rewards[0].weight": [-1.0, 0.0], "algorithm.entropy_coef": [-0.01, 0.01], "optim.power.b": [-2.0],
         "algorithm.kl_coef": [0.1], "algorithm.num_iterations": [2], "rollout.top_k": [1],
         "rollout.temperature": [100.0]}

KEYS = numeric_keys()


def _completion_tokens(metrics, trainer) -> float:
    r = trainer.config.rollout
    return metrics["completion/len_mean"] * r.prompts_per_step * r.group_size


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Hundreds of tiny steps: one thread each is several times faster than two on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nudge(key: NumericKey, bound: float) -> float | int:
    return 1 if key.kind is int else max(abs(bound) * 1e-6, 1e-6)


def cases(key: NumericKey) -> list[tuple[object, bool]]:
    """(value, inside the range) at and just past each finite bound; an open bound is itself just past."""
    r, out = key.range, []
    if r.low is not None:
        inside = key.kind(r.low + _nudge(key, r.low)) if r.low_open else key.kind(r.low)
        outside = key.kind(r.low) if r.low_open else key.kind(r.low - _nudge(key, r.low))
        out += [(inside, True), (outside, False)]
    if r.high is not None:
        inside = key.kind(r.high - _nudge(key, r.high)) if r.high_open else key.kind(r.high)
        outside = key.kind(r.high) if r.high_open else key.kind(r.high + _nudge(key, r.high))
        out += [(inside, True), (outside, False)]
    if key.optional:
        out.append((None, True))
    if key.kind is float:
        out += [(math.nan, False), (math.inf, False), (-math.inf, False)]
    out += [(v, True) for v in EXTRA.get(key.path, [])]
    return out


def _text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf
    return repr(value)


def _override(key: NumericKey, value) -> str:
    if key.path == "rewards[0].weight":
        return f"rewards=[{{name: '{REWARD}', weight: {_text(value)}}}]"
    return f"{key.path}={_text(value)}"


def _context(path: str) -> list[str]:
    prefixes = [p for p in CONTEXT if path.startswith(p)]
    return CONTEXT[max(prefixes, key=len)] if prefixes else []


def _loaded_value(config, path: str):
    obj = config
    for part in path.replace("[0]", ".0").split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _finite(metrics: dict) -> list[str]:
    return [k for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(v)]


def _train(config, path: str, label: str) -> None:
    from reasonrl.trainers.grpo import GRPOTrainer

    trainer = GRPOTrainer(config)
    try:
        if path.startswith(RUN):
            trainer.run()
            rows = [json.loads(line) for line in (Path(config.trainer.output_dir) / "metrics.jsonl").read_text()
                    .splitlines()]
            assert [row["step"] for row in rows if "reward/mean" in row] == list(range(1, config.trainer.steps + 1))
            for row in rows:
                assert not _finite(row), f"{label}: step {row['step']}: not finite: {_finite(row)}"
            return
        steps = max([n for p, n in STEPS.items() if path.startswith(p)], default=1)
        for _ in range(steps):
            metrics = trainer.train_step()
            assert not _finite(metrics), f"{label}: not finite: {_finite(metrics)}"
            assert metrics["train/skipped"] == 0, f"{label}: the step trained on nothing"
        evidence = [check for prefix, check in EVIDENCE.items() if path.startswith(prefix)]
        assert all(check(metrics, trainer) for check in evidence), f"{label}: the key's component did not act"
    finally:
        trainer.close()


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.path)
def test_values_at_and_past_the_range(key, tmp_path):
    run_steps = ["trainer.steps=2"] if key.path.startswith(RUN) else []
    for i, (value, inside) in enumerate(cases(key)):
        overrides = [*SMALL, *run_steps, *_context(key.path), _override(key, value),
                     f"trainer.output_dir={tmp_path / f'run{i}'}"]
        label = f"{key.path}={_text(value)} (range {key.range})"
        if not inside:
            with pytest.raises(ConfigError) as err:
                load_config(SMOKE, overrides)
            assert key.path in str(err.value), label
            continue
        config = load_config(SMOKE, overrides)  # inside the declared range: loads
        loaded = _loaded_value(config, key.path)
        assert loaded == value or (loaded is value is None), label
        try:
            validate(config, world_size=1)
        except ConfigError as err:
            assert key.path in str(err), f"{label}: {err}"
            assert (key.path, value) in REFUSED_BY_RULES, f"{label} is refused by a cross-key rule: {err}"
            continue
        assert (key.path, value) not in REFUSED_BY_RULES, f"{label} was expected to be refused"
        if key.path not in LOAD_ONLY:
            _train(config, key.path, label)


def test_load_only_keys_are_schema_keys():
    assert set(LOAD_ONLY) <= {k.path for k in KEYS}
    assert {path for path, _ in REFUSED_BY_RULES} <= {k.path for k in KEYS}
