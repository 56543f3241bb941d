"""`accelerate launch --multi_gpu --num_processes 2` on CPU (torchrun + gloo): two ranks end with identical parameters.

(`--cpu` or no flag makes accelerate start ONE process on a machine without GPUs.)
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_end_with_identical_parameters_and_resume_on_one(tiny_model_dir, tmp_path):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "reasonrl.trainers.grpo",
        "--config", str(REPO / "recipes" / "tiny_smoke.yaml"), f"model.name_or_path={tiny_model_dir}",
        "rewards=[{name: 'rewards_for_tests:digit_count'}]", "trainer.steps=2", f"trainer.output_dir={tmp_path}",
        "logging.wandb_mode=disabled",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "eval_results.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_identical"] is True
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/policy" in r] == [1, 2]
    assert all(r["train/skipped"] == 0 for r in rows if "loss/policy" in r)  # both steps really trained
    # the 2-process checkpoint resumes in a single process (a change of process count)
    resume = [sys.executable, "-m", "reasonrl.trainers.grpo", *cmd[cmd.index("--config"):], "trainer.steps=3",
              "trainer.resume=auto"]
    done = subprocess.run(resume, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 2" in done.stdout
    summary = json.loads((tmp_path / "eval_results.json").read_text())
    assert summary["num_processes"] == 1 and summary["steps"] == 3
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/policy" in r] == [1, 2, 3]
