"""Every numeric key of the schema declares its range, and values that load but make no sense (issue 20, item 4)
are refused before any model is loaded, naming the key."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from schema_keys import numeric_keys

from reasonrl.config import ConfigError, Range, load_config
from reasonrl.trainers.validation import needs_entropy, validate

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "recipes" / "tiny_smoke.yaml"
KEYS = numeric_keys()


def test_the_walk_finds_the_numeric_keys():
    paths = {k.path for k in KEYS}
    assert {"optim.lr", "rollout.top_k", "algorithm.hapo.fallback_threshold", "rewards[0].weight",
            "model.sparse_attention.local_world_size", "trainer.max_failed_reward_steps"} <= paths
    assert "model.lora.enabled" not in paths and "rollout.is_correction" not in paths  # bools are not numbers
    assert len(KEYS) > 80


@pytest.mark.parametrize("key", KEYS, ids=lambda k: k.path)
def test_every_numeric_key_declares_a_range_and_a_doc(key):
    assert isinstance(key.range, Range), f"{key.path}: declare it with bounded(default, low, high, doc=...)"
    assert key.doc, f"{key.path}: bounded(..., doc=...) says what the number means"
    assert key.default is None or key.default in key.range, f"{key.path}: the default is outside its own range"


def test_ranges_hold_finite_numbers_only():
    unit = Range(0, 1, low_open=True)
    assert 1 in unit and 0.5 in unit and 0 not in unit and 1.5 not in unit and str(unit) == "(0, 1]"
    anything = Range()
    assert -1e300 in anything and str(anything) == "(-inf, inf)"
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert bad not in unit and bad not in anything and bad not in Range(high=0)
    assert str(Range(0, 2**32 - 1)) == "[0, 4294967295]"


def test_the_message_names_the_key_the_value_and_the_range():
    with pytest.raises(ConfigError, match=re.escape("optim.lr=-1.0 is out of range: it must be in (0, 1]")):
        load_config(None, ["optim.lr=-1"])


@pytest.mark.parametrize("override, key", [
    ("algorithm.kl_coef=-1", "algorithm.kl_coef"), ("algorithm.std_eps=-1", "algorithm.std_eps"),
    ("optim.lr=-1", "optim.lr"), ("rollout.top_p=5", "rollout.top_p"),
    ("algorithm.hapo.clip_alpha=-1", "algorithm.hapo.clip_alpha"),
    ("algorithm.hapo.fallback_threshold=-1", "algorithm.hapo.fallback_threshold"),
    ("algorithm.rmt.token_fraction=2", "algorithm.rmt.token_fraction"),
    ("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
    ("rewards=[{name: accuracy, weight: .inf}]", "rewards[0].weight"),
])
def test_the_issue_examples_are_refused_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(SMOKE, [override])


def test_a_keep_end_below_the_default_starts_is_refused_by_validate():
    """algorithm.d3s.keep_end=0.3 alone is in its range; with the default starts (1.0) the token level would switch
    on mid-run (without the entropies it reads): a cross-key rule."""
    config = load_config(SMOKE, ["algorithm.d3s.keep_end=0.3"])
    with pytest.raises(ConfigError, match=re.escape("algorithm.d3s.keep_end")):
        validate(config, world_size=1)


@pytest.mark.parametrize("override, key", [
    (["algorithm.d3s.keep_end=0.3"], "algorithm.d3s.keep_end"),  # default starts 1.0: the levels would switch on
    (["algorithm.d3s.sample_keep_start=0.5", "algorithm.d3s.keep_end=0.3"], "algorithm.d3s.keep_end"),
    (["algorithm.d3s.sample_keep_start=0.5", "algorithm.d3s.schedule=step", "algorithm.d3s.ramp_fraction=1"],
     "algorithm.d3s.ramp_fraction"),
    (["algorithm.d3s.sample_keep_start=0.5", "rollout.group_size=2"], "algorithm.d3s.min_keep"),
    (["algorithm.rmt.rl_weight=0"], "algorithm.rmt.rl_weight"),
    (["algorithm.rmt.rl_weight=0", "algorithm.rmt.ntp_weight_start=0.5"], "algorithm.rmt.ntp_weight_end"),
    (["algorithm.overlong.penalty=true", "algorithm.overlong.buffer=13"], "algorithm.overlong.buffer"),
    (["algorithm.loss_norm_constant=8"], "algorithm.loss_norm_constant"),
    (["optim.schedule=wsd", "optim.warmup_steps=2", "optim.decay_steps=2"], "optim.decay_steps"),
    (["optim.warmup_steps=4"], "optim.warmup_steps"),
    (["optim.decay_steps=1"], "optim.decay_steps"),
    (["optim.final_factor=0.1", "optim.schedule=cosine"], "optim.final_factor"),
    (["optim.schedule=power", "optim.warmup_steps=1"], "optim.warmup_steps"),
    (["optim.schedule=power", "optim.power.decay_tokens=10"], "optim.power.total_tokens"),
    (["optim.schedule=power", "optim.power.decay_tokens=10", "optim.power.total_tokens=15",
      "optim.power.warmup_tokens=6"], "optim.power.warmup_tokens"),
    (["optim.lr=0.5", "optim.weight_decay=2"], "optim.weight_decay"),
    (["rollout.is_floor=0.5"], "rollout.is_floor"),
    (["rollout.max_staleness=1"], "rollout.engine"),  # the hf engine samples with the learner's own weights
    (["rollout.max_staleness=1", "rollout.engine=vllm"], "rollout.engine"),
    (["rollout.inflight_updates=true", "rollout.engine=server"], "rollout.max_staleness"),
    (["rollout.stale=regenerate", "rollout.engine=server"], "rollout.max_staleness"),
    (["rollout.max_staleness=1", "rollout.engine=server", "rollout.inflight_chunk_tokens=4"],
     "rollout.inflight_chunk_tokens"),
    (["rewards=[{name: accuracy, weight: 0}]"], "weight"),
    (["data.num_train=0"], "data.num_train"),
    (["data.min_operands=3"], "data.min_operands"),  # above data.operands=2
    (["data.operands=3", "data.min_operands=1"], "data.min_operands"),  # one number is no problem
    (["model.attn_implementation=reasonrl_sparse", "model.sparse_attention.impl=triton",
      "model.sparse_attention.block_size=24"], "model.sparse_attention.block_size"),
    (["model.attn_implementation=reasonrl_sparse", "model.sparse_attention.vertical_size=8"],
     "model.sparse_attention.vertical_size"),
    (["model.attn_implementation=reasonrl_sparse", "model.sparse_attention.slash_size=8"],
     "model.sparse_attention.slash_size"),
])
def test_cross_key_rules_name_their_keys(override, key):
    config = load_config(SMOKE, override)  # each value alone is in its range
    with pytest.raises(ConfigError, match=re.escape(key)):
        validate(config, world_size=1)


def test_async_training_rules():
    """Asynchronous training is valid with the server engine (in-flight updates, regeneration, DAPO), and refused
    with sequence parallelism, whose rollouts are broadcast by a collective a generation thread cannot join."""
    server = ["rollout.engine=server", "rollout.max_staleness=2"]
    validate(load_config(SMOKE, [*server, "rollout.inflight_updates=true", "rollout.inflight_chunk_tokens=4",
                                 "rollout.stale=regenerate", "algorithm.dynamic_sampling.enabled=true"]), world_size=1)
    sp = ["model.attn_implementation=reasonrl_sparse", "model.sparse_attention.sequence_parallel=2",
          "optim.micro_batch_size=1"]
    with pytest.raises(ConfigError, match=r"rollout.max_staleness >= 1 is not supported with model.sparse_attention"):
        validate(load_config(SMOKE, [*server, *sp]), world_size=2)


def test_a_d3s_that_relaxes_is_valid():
    validate(load_config(SMOKE, ["algorithm.d3s.sample_keep_start=0.5", "algorithm.d3s.token_keep_start=0.2",
                                 "algorithm.d3s.keep_end=0.8", "algorithm.d3s.schedule=step"]), world_size=1)


@pytest.mark.parametrize("override, needed", [
    ([], False), (["algorithm.entropy_coef=0.01"], False), (["algorithm.d3s.sample_keep_start=0.5"], False),
    (["algorithm.d3s.token_keep_start=0.5"], True), (["algorithm.d3s.token_keep_start=0.5", "algorithm.d3s.keep_end=0.6"], True),
    (["algorithm.hapo.adaptive_temperature=true"], True), (["algorithm.hapo.adaptive_clip=true"], True),
    (["algorithm.hapo.redistribution=true"], True), (["algorithm.rmt.curriculum=true"], True),
])
def test_needs_entropy(override, needed):
    assert needs_entropy(load_config(SMOKE, override)) is needed


@pytest.mark.parametrize("override, key", [
    ("algorithm.kl_coef=-1", "algorithm.kl_coef"),  # refused by load_config
    ("algorithm.d3s.keep_end=0.3", "algorithm.d3s.keep_end"),  # refused by validate, before the model is loaded
])
def test_the_cli_refuses_before_loading_the_model(tmp_path, override, key):
    exe = Path(sys.executable).with_name("reasonrl")
    command = [str(exe)] if exe.is_file() else [sys.executable, "-m", "reasonrl.cli"]
    out_dir = tmp_path / "run"
    start = time.perf_counter()
    done = subprocess.run([*command, "train", str(SMOKE), override, f"trainer.output_dir={out_dir}"],
                          check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode != 0
    assert key in done.stderr
    assert not out_dir.exists()  # the trainer writes config.yaml there once the model is loaded
    assert "Loading weights" not in done.stdout + done.stderr
    assert time.perf_counter() - start < 120
