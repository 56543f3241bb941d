"""Issue 6 methods through the real entry point: reward shapers (overlong, RMT budget, effort), the RMT token
curriculum and dual loss; the shapers' per-prompt statistics survive checkpoint and resume."""

import json
import shutil
from pathlib import Path

import pytest

from reasonrl.trainers import grpo
from reasonrl.trainers.checkpoint import list_checkpoints, load_trainer_state

HERE = Path(__file__).resolve().parent


def args(model_dir, out_dir, steps, **extra):
    base = {
        "model.name_or_path": model_dir, "data.num_train": 16, "data.num_eval": 2,
        "rewards": "[{name: 'rewards_for_tests:digit_count'}]", "rollout.group_size": 4, "rollout.prompts_per_step": 2,
        "rollout.max_new_tokens": 8, "optim.lr": 1e-3, "trainer.steps": steps, "trainer.output_dir": str(out_dir),
        "trainer.save_every": 1, "trainer.keep_last": 5, "trainer.eval_every": 0, "trainer.eval_max_new_tokens": 4,
        "logging.wandb_mode": "disabled",
        "algorithm.reward_shapers": "[{name: overlong, args: {buffer: 4}}, {name: rmt_budget, args: {gamma: 0.5, "
                                    "minimum: 2}}, {name: effort, args: {mean: ema, levels: [0.5, 1.0]}}]",
        "algorithm.rmt.curriculum": True, "algorithm.rmt.ntp_weight_start": 0.5, "algorithm.rmt.ntp_weight_end": 1.0,
        "algorithm.rmt.ntp_rows": "all",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def history(out_dir):
    return {row["step"]: row for row in map(json.loads, (Path(out_dir) / "metrics.jsonl").read_text().splitlines())}


def test_length_control_runs_and_resumes_with_its_statistics(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # rewards_for_tests
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert grpo.main(args(tiny_model_dir, full, 3)) == 0
    rows = history(full)
    for step in (1, 2, 3):
        for key in ("rmt/budget_mean", "rmt/length_reward_mean", "effort/within_frac", "rmt/ntp_weight", "loss/ntp"):
            assert key in rows[step], (step, key)
        assert rows[step]["loss/ntp"] > 0
    assert rows[1]["rmt/ntp_weight"] == 0.5 and rows[3]["rmt/ntp_weight"] == 1.0  # the schedule's endpoints
    assert rows[3]["rmt/budget_mean"] < rows[1]["rmt/budget_mean"]  # the budget tightens
    saved = load_trainer_state(list_checkpoints(full)[-1])
    assert saved["shapers"][1]["means"] and saved["shapers"][2]["means"]  # budget and effort statistics saved
    # a crash after step 2: a new run folder holding only that checkpoint resumes (same total steps, so the same
    # schedules), and step 3 sees the same budgets and statistics, so the same metrics
    step2 = next(p for p in list_checkpoints(full) if p.name.endswith("2"))
    shutil.copytree(step2, cut / step2.relative_to(full))
    assert grpo.main(args(tiny_model_dir, cut, 3, **{"trainer.resume": "auto"})) == 0
    a, b = history(full)[3], history(cut)[3]
    for key in ("rmt/budget_mean", "effort/mean_length", "loss/ntp", "reward/mean", "optim/grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
