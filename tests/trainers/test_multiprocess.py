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


def test_zero3_run_checkpoints_a_full_model_and_resumes_on_one_process(tiny_model_dir, tmp_path):
    """The whole trainer under DeepSpeed ZeRO-3 on 2 processes: sharded generation in lockstep (synced_gpus), an
    uneven eval split (5 rows on 2 ranks), the KL reference, the gathered checkpoint; then 1 process resumes it."""
    common = [
        "--config", str(REPO / "recipes" / "tiny_smoke.yaml"), f"model.name_or_path={tiny_model_dir}",
        "rewards=[{name: 'rewards_for_tests:digit_count'}]", f"trainer.output_dir={tmp_path}",
        "logging.wandb_mode=disabled", "data.num_eval=5", "algorithm.kl_coef=0.05", "algorithm.num_iterations=2",
    ]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/zero3.yaml",
           "--num_processes", "2", "-m", "reasonrl.trainers.grpo", *common, "trainer.steps=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "eval_results.json").read_text())
    assert summary["num_processes"] == 2 and summary["ranks_identical"] is True
    assert [e["n"] for e in summary["eval_history"]] == [5, 5]  # the padding row is not scored
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in trained] == [1, 2] and all(r["train/skipped"] == 0 for r in trained)
    assert trained[-1]["policy/kl"] > 0  # the policy moved away from the (unsharded) reference
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "checkpoints" / "step-000002" / "model" / "model.safetensors")
    assert all(t.numel() > 0 for t in saved.values())  # gathered, not the empty ZeRO-3 placeholders
    resume = [sys.executable, "-m", "reasonrl.trainers.grpo", *common, "trainer.steps=3", "trainer.resume=auto"]
    done = subprocess.run(resume, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 2" in done.stdout
    summary = json.loads((tmp_path / "eval_results.json").read_text())
    assert summary["num_processes"] == 1 and summary["steps"] == 3


def test_zero3_pushes_gathered_weights_into_each_ranks_vllm_engine(vllm_module, vllm_tiny_model_dir, tmp_path):
    """rollout.engine=vllm under ZeRO-3 on 2 processes: each rank's engine receives the parameters gathered bucket
    by bucket after every step, and the parity probe finds it scoring like the updated (sharded) policy."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/zero3.yaml",
           "--num_processes", "2", "-m", "reasonrl.trainers.grpo", "--config", str(REPO / "recipes" / "tiny_smoke.yaml"),
           f"model.name_or_path={vllm_tiny_model_dir}", "rewards=[{name: 'rewards_for_tests:digit_count'}]",
           "trainer.steps=2", f"trainer.output_dir={tmp_path}", "logging.wandb_mode=disabled", "rollout.engine=vllm",
           f"rollout.vllm_kv_cache_bytes={1 << 28}", "trainer.eval_at_start=false"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "loss/policy" in r]
    assert [r["step"] for r in trained] == [1, 2] and all(r["train/skipped"] == 0 for r in trained)
    assert all(r["sync/prob_gap_max"] < 1e-4 for r in trained)  # fp32 engine: the same probabilities
    assert json.loads((tmp_path / "eval_results.json").read_text())["ranks_identical"] is True
