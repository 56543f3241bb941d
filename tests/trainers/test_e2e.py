"""The real entry point on the tiny model: learning changes every parameter, and resume repeats the next step."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import trainer_env
from safetensors.torch import load_file

from reasonrl.trainers import grpo, validation
from reasonrl.trainers.checkpoint import latest_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[2]


def overrides(model_dir, out_dir, steps, **extra):
    base = {
        "model.name_or_path": model_dir, "data.num_train": 32, "data.num_eval": 4,
        "rewards": "[{name: 'rewards_for_tests:digit_count'}]",
        "rollout.group_size": 4, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 6,
        "optim.lr": 1e-3, "optim.micro_batch_size": 3, "trainer.steps": steps, "trainer.output_dir": str(out_dir),
        "trainer.save_every": 1, "trainer.keep_last": 5, "trainer.eval_every": 0, "trainer.eval_max_new_tokens": 4,
        "logging.wandb_mode": "offline",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def history(out_dir):
    return {row["step"]: row for row in map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())}


def test_training_changes_every_parameter_and_logs_everything(tiny_model_dir, tmp_path):
    assert grpo.main(overrides(tiny_model_dir, tmp_path, 2)) == 0
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    after = load_file(str(latest_checkpoint(tmp_path) / "model" / "model.safetensors"))
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []
    rows = history(tmp_path)
    assert set(rows) == {0, 1, 2}  # eval at step 0, then two training steps
    for step in (1, 2):
        row = rows[step]
        # one reward of weight 1 and no shaper: the step's reward is that function's mean
        assert row["reward/mean"] == pytest.approx(row["reward/rewards_for_tests:digit_count"])
        assert 0 <= row["reward/zero_std_frac"] <= 1 and 0 <= row["completion/clipped_frac"] <= 1
        assert 0 < row["completion/len_mean"] <= row["completion/len_max"] <= 6  # rollout.max_new_tokens
        assert row["policy/entropy"] > 0 and row["optim/grad_norm"] > 0 and math.isfinite(row["loss/policy"])
        assert row["optim/lr"] == 1e-3  # constant schedule
        assert 0 <= row["clip/low_frac"] <= 1 and 0 <= row["clip/high_frac"] <= 1
        assert min(row["time/generate"], row["time/prepare"], row["time/train"]) > 0
        assert row["throughput/gen_tokens_per_s"] > 0 and row["train/skipped"] == 0
    assert 0 <= rows[2]["eval/accuracy"] <= 1
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "eval_results.json").is_file()
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # an offline W&B run was written


def test_resume_reproduces_the_next_step(tiny_model_dir, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert grpo.main(overrides(tiny_model_dir, full, 3)) == 0
    assert grpo.main(overrides(tiny_model_dir, cut, 2)) == 0  # "killed" after step 2's checkpoint
    assert grpo.main(overrides(tiny_model_dir, cut, 3, **{"trainer.resume": "auto"})) == 0
    a, b = history(full)[3], history(cut)[3]
    assert b["loss/policy"] == pytest.approx(a["loss/policy"], rel=1e-5, abs=1e-7)
    assert b["reward/mean"] == a["reward/mean"]  # the same prompts and samples: data position restored
    assert [p.name for p in list_checkpoints(cut)] == ["step-000001", "step-000002", "step-000003"]


def test_bad_config_fails_before_loading_anything(tmp_path, capsys):
    assert grpo.main(["trainer.stepz=3"]) == 2
    assert "trainer.stepz" in capsys.readouterr().err
    assert grpo.main(["rollout.engine=tgi"]) == 2
    assert "choose one of" in capsys.readouterr().err


def test_invalid_combinations_are_rejected(tiny_model_dir, tmp_path):
    from reasonrl.config import ConfigError, load_config

    for bad in (["rollout.group_size=1"], ["rewards=[{name: nonexistent}]"], ["rollout.temperature=0"]):
        with pytest.raises(ConfigError):
            validation.validate(load_config(None, bad), world_size=1)
    with pytest.raises(ConfigError, match="multiple of the number of processes"):
        validation.validate(load_config(None, ["rollout.prompts_per_step=3"]), world_size=2)


def test_missing_model_names_the_fix(tmp_path):
    from reasonrl.models import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        grpo.main(overrides(str(tmp_path / "nope"), tmp_path / "run", 1))


def test_a_raising_reward_is_counted_and_one_failed_step_is_skipped(tiny_model_dir, tmp_path):
    rewards = "[{name: 'rewards_for_tests:always_raises'}, {name: 'rewards_for_tests:digit_count'}]"
    assert grpo.main(overrides(tiny_model_dir, tmp_path, 1, rewards=rewards)) == 0
    row = history(tmp_path)[1]
    assert row["reward/errors"] == 1 and row["reward/invalid"] == 8 and row["train/skipped"] == 1


def test_partial_reward_failures_are_counted_skips(tiny_model_dir, tmp_path):
    rewards = "[{name: 'rewards_for_tests:nan_on_every_other_sample'}]"
    assert grpo.main(overrides(tiny_model_dir, tmp_path, 3, rewards=rewards)) == 0
    rows = history(tmp_path)
    assert all(rows[s]["reward/invalid"] == 4 and rows[s]["reward/errors"] == 1 for s in (1, 2, 3))


def test_a_reward_that_always_fails_stops_the_run_with_its_traceback(tiny_model_dir, tmp_path):
    rewards = "[{name: 'rewards_for_tests:always_raises'}]"
    run = subprocess.run([sys.executable, "-m", "reasonrl.trainers.grpo",
                          *overrides(tiny_model_dir, tmp_path, 6, rewards=rewards)],
                         capture_output=True, text=True, cwd=REPO, env=trainer_env(Path(__file__).parent), timeout=300, check=False)
    assert run.returncode != 0
    assert "RewardFailureError" in run.stderr and "max_failed_reward_steps=2" in run.stderr
    assert "this reward is broken on purpose" in run.stderr and "in always_raises" in run.stderr  # its traceback
    assert set(history(tmp_path)) <= {0, 1}  # stopped during step 2: nothing more was logged


def test_reasonrl_eval_prints_one_json_line(tiny_model_dir, tmp_path):
    assert grpo.main(overrides(tiny_model_dir, tmp_path, 1)) == 0
    out = subprocess.run(
        [sys.executable, "-m", "reasonrl.cli", "eval", str(tmp_path), "--n", "3", "--max-new-tokens", "4", "--json"],
        capture_output=True, text=True, cwd=REPO, check=True,
    ).stdout.strip().splitlines()[-1]
    result = json.loads(out)
    assert result["n"] == 3 and 0.0 <= result["accuracy"] <= 1.0 and result["model"].endswith("model")


@pytest.mark.parametrize("algo", ["dr_grpo", "dapo", "hapo", "d3s", "hapo_d3s"])
def test_every_algorithm_recipe_trains_end_to_end(tiny_model_dir, tmp_path, algo):
    """The algorithm recipes of the default task, on the tiny model, through the real entry point."""
    extra = {"trainer.eval_at_start": "false", "trainer.save_every": 0, "trainer.steps": 3,
             "rollout.prompts_per_step": 4, "algorithm.overlong.buffer": 3}
    args = ["--config", str(REPO / "recipes" / "arith" / f"{algo}.yaml"),
            *overrides(tiny_model_dir, tmp_path, 3, **extra)]
    assert grpo.main(args) == 0
    rows = history(tmp_path)
    trained = [rows[s] for s in (1, 2, 3)]
    assert all(r["train/skipped"] == 0 for r in trained[:1]), "the first step had no signal"
    if algo in ("d3s", "hapo_d3s"):  # aggressive down-sampling first, none at the end of the ramp
        assert trained[0]["d3s/sample_keep_frac"] < 1 and trained[0]["d3s/token_keep_frac"] < 1
        assert trained[-1]["d3s/sample_keep_frac"] == 1 and trained[-1]["d3s/token_keep_frac"] == 1
    if algo.startswith("hapo"):
        assert trained[0]["hapo/entropy_pivot"] > 0 and 0 <= trained[0]["hapo/adv_changed_frac"] <= 1
        # step 1 samples at T0 (no statistics yet); later steps log the temperatures they sampled with
        assert "hapo/temperature_mean" not in trained[0]
        assert trained[1]["hapo/temperature_min"] <= trained[1]["hapo/temperature_mean"] <= trained[1][
            "hapo/temperature_max"]
    if algo == "dapo" or algo.startswith("hapo"):
        for r in trained:  # dynamic sampling keeps groups with a reward spread only, up to the step's prompts
            assert 1 <= r["dynamic/gen_rounds"] <= 3 and r["dynamic/prompts_generated"] == 4 * r["dynamic/gen_rounds"]
            assert r["dynamic/groups_kept"] == 4 or r["dynamic/shortfall"] == 1
            if r["dynamic/shortfall"] == 0:
                assert r["reward/zero_std_frac"] == 0
        # the random model runs into max_new_tokens = 6 with an overlong buffer of 3: penalised
        assert -1 <= trained[0]["reward/overlong_penalty"] < 0


def test_power_schedule_follows_tokens_and_kl_in_reward(tiny_model_dir, tmp_path):
    extra = {"optim.schedule": "power", "optim.power.ref_tokens": 10, "optim.power.b": -0.5,
             "algorithm.kl_coef": 0.1, "algorithm.kl_in": "reward", "trainer.eval_at_start": "false",
             "rollout.is_correction": "true"}
    assert grpo.main(overrides(tiny_model_dir, tmp_path, 3, **extra)) == 0
    rows = history(tmp_path)
    lrs = [rows[s]["optim/lr"] for s in (1, 2, 3)]
    assert lrs[0] > lrs[1] > lrs[2] > 0  # past ref_tokens the power law decays with the tokens seen
    assert all("reward/kl_penalty" in rows[s] for s in (1, 2, 3))
    # the hf engine samples with the trainer's own weights: its log-probs agree with the trainer's
    assert all(rows[s]["sampling/logp_diff_mean"] < 1e-3 for s in (1, 2, 3))
    assert all(abs(rows[s]["sampling/is_ratio_mean"] - 1) < 1e-3 for s in (1, 2, 3))
