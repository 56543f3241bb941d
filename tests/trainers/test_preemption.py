"""SIGTERM mid-run: the trainer finishes the step, writes a checkpoint, exits with 143; resume=auto continues."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from reasonrl.trainers.checkpoint import latest_checkpoint
from reasonrl.trainers.preemption import EXIT_CODE, PreemptionWatch

HERE = Path(__file__).resolve().parent


def _args(model_dir, out_dir, steps, *extra):
    return [
        f"model.name_or_path={model_dir}", "data.num_train=64", "data.num_eval=4",
        "rewards=[{name: 'rewards_for_tests:digit_count'}]", "rollout.group_size=4", "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=6", "optim.lr=1e-3", f"trainer.steps={steps}", f"trainer.output_dir={out_dir}",
        "trainer.save_every=0", "trainer.eval_every=0", "trainer.eval_at_start=false",
        "trainer.eval_max_new_tokens=4", "logging.wandb_mode=disabled", *extra,
    ]


def _steps_logged(out_dir: Path) -> list[int]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def test_watch_records_the_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionWatch() as watch:
        assert watch.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.received == signal.SIGUSR1 and watch.signal_name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before
    assert EXIT_CODE == 143


def test_sigterm_writes_a_checkpoint_and_resume_continues(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "reasonrl.trainers.grpo", *_args(tiny_model_dir, tmp_path, 1000)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while not _steps_logged(tmp_path) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert _steps_logged(tmp_path), proc.communicate(timeout=30)[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_CODE, out[-3000:]
    assert "SIGTERM received: stopped after step" in out
    stopped_at = max(_steps_logged(tmp_path))
    assert stopped_at < 1000
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None and int(checkpoint.name.split("-")[-1]) == stopped_at
    resumed = subprocess.run(
        [sys.executable, "-m", "reasonrl.trainers.grpo",
         *_args(tiny_model_dir, tmp_path, stopped_at + 1, "trainer.resume=auto")],
        env=env, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"at step {stopped_at}" in resumed.stdout
    assert max(_steps_logged(tmp_path)) == stopped_at + 1
