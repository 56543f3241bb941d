"""Resume after a hard kill: the metrics hold each step once, W&B is rewound, and training ends where an
uninterrupted run ends (issue 20, item 7)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import trainer_env
from safetensors.torch import load_file

from reasonrl.trainers.checkpoint import latest_checkpoint
from reasonrl.trainers.tracking import Tracker, keep_history_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STEPS, SAVE_EVERY = 6, 2


def _command(model_dir, out_dir, *extra):
    return [
        sys.executable, "-m", "reasonrl.trainers.grpo", "--config", str(REPO / "recipes" / "tiny_smoke.yaml"),
        f"model.name_or_path={model_dir}", "rewards=[{name: 'resume_rewards:digit_count_stalling'}]",
        f"trainer.steps={STEPS}", f"trainer.save_every={SAVE_EVERY}", f"trainer.output_dir={out_dir}",
        "trainer.eval_at_start=false", "data.num_eval=0", "rollout.max_new_tokens=8", *extra,
    ]


def _env(**extra):
    return trainer_env(HERE, OMP_NUM_THREADS="1", **extra)


def _run_to_the_end(command: list) -> str:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _logged_steps(out_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def _final_weights(out_dir: Path) -> dict:
    return load_file(str(out_dir / "checkpoints" / f"step-{STEPS:06d}" / "model" / "model.safetensors"))


def _kill_at_reward_call(command: list, call: int, marker: Path) -> None:
    """Start the run and SIGKILL it while its `call`-th reward computation (step `call` of this process) runs."""
    with open(marker.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=_env(REASONRL_STALL_AT_CALL=str(call), REASONRL_STALL_MARKER=str(marker)))
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=60)
    assert marker.exists(), marker.with_suffix(".log").read_text()[-3000:]


def test_runs_killed_mid_step_resume_with_each_step_logged_once_and_the_same_weights(tiny_model_dir, tmp_path):
    """kill -9 during step 3 of a 6-step run saving every 2 steps; resume, and kill -9 again during step 4 (step 3
    is logged by then, the latest checkpoint is still step 2); resume: steps 1..6 once each, the weights of an
    uninterrupted run, and one W&B run rewound twice."""
    reference = tmp_path / "uninterrupted"
    _run_to_the_end(_command(tiny_model_dir, reference, "logging.wandb_mode=disabled"))

    out = tmp_path / "run"
    run = _command(tiny_model_dir, out, "logging.wandb_mode=offline")
    _kill_at_reward_call(run, 3, tmp_path / "killed_in_step_3")
    assert latest_checkpoint(out).name == "step-000002" and _logged_steps(out) == [1, 2]
    _kill_at_reward_call([*run, "trainer.resume=auto"], 2, tmp_path / "killed_in_step_4")  # resumed at step 2
    assert latest_checkpoint(out).name == "step-000002" and _logged_steps(out) == [1, 2, 3]

    assert "at step 2" in _run_to_the_end([*run, "trainer.resume=auto"])
    assert _logged_steps(out) == list(range(1, STEPS + 1))
    expected, got = _final_weights(reference), _final_weights(out)
    initial = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert any(not torch.equal(expected[name], initial[name]) for name in initial)  # the steps did train
    assert got.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(got[name], expected[name])] == []
    segments = sorted((out / "wandb").glob("offline-run-*"))  # one folder per process, all of the same W&B run
    run_id = (out / "wandb_run_id").read_text().strip()
    assert len(segments) == 3 and all(p.name.endswith(f"-{run_id}") for p in segments)


def _rows(*steps) -> str:
    return "".join(json.dumps({"step": s, "reward/mean": 0.5}) + "\n" for s in steps)


def test_history_keeps_the_steps_up_to_the_checkpoint_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(0, 1, 2, 3, 4) + '{"step": 5, "rew')  # killed while writing step 5
    keep_history_until(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    keep_history_until(path, None)  # a fresh run in the same folder starts a new history
    assert path.read_text() == ""
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # the temporary file was renamed into place


def _tracker(out_dir, resume_step, mode="offline"):
    return Tracker(active=True, output_dir=str(out_dir), project="reasonrl-tests", mode=mode, config={},
                   run_name="t", resume_step=resume_step)


def test_a_resumed_run_rewinds_its_wandb_run_to_the_checkpoint_step(tmp_path):
    first = _tracker(tmp_path, None)
    first.log(1, {"reward/mean": 0.1}, console=lambda _: None)
    first.finish()
    resumed = _tracker(tmp_path, 1)
    moment = resumed.run.settings.resume_from
    resumed.finish()
    assert resumed.run.id == first.run.id
    assert (moment.run, moment.metric, moment.value) == (first.run.id, "_step", 1)


class _WandbWithoutRewind:
    """wandb online against a server that refuses rewinds (a preview feature that an account may not have)."""

    def __init__(self):
        import wandb

        self.errors = wandb.errors
        self.calls = []

    def init(self, **kwargs):
        self.calls.append(kwargs)
        if "resume_from" in kwargs:
            raise self.errors.CommError("failed to rewind run: not enabled")
        return type("Run", (), {"id": kwargs["id"]})()


def test_a_refused_rewind_logs_to_a_new_wandb_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "wandb_run_id").write_text("oldrun")
    fake = _WandbWithoutRewind()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = _tracker(tmp_path, 4, mode="online")
    assert fake.calls[0]["resume_from"] == "oldrun?_step=4"
    new_id = (tmp_path / "wandb_run_id").read_text()
    assert tracker.run.id == fake.calls[1]["id"] == new_id != "oldrun"
    assert "could not rewind run oldrun to step 4" in capsys.readouterr().err
