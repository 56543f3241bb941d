"""A rank that dies makes the job fail fast with a clear message instead of hanging.

The hard case: two machines (accelerate on loopback, one process each). When the process of machine 1 dies, its
own launcher exits, but nothing tells machine 0's launcher; its rank sits in the next collective. It must stop on
its own, with an error that says a peer died, well inside trainer.collective_timeout_s.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reasonrl.rollout.server_engine import ServerUnavailableError
from reasonrl.trainers import grpo

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_a_dead_machine_stops_the_other_with_a_clear_error(tiny_model_dir, tmp_path, free_port):
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    recipe = [
        "-m", "reasonrl.trainers.grpo", "--config", str(REPO / "recipes" / "tiny_smoke.yaml"),
        f"model.name_or_path={tiny_model_dir}", "rewards=[{name: 'rewards_for_tests:dies_on_rank1_at_step2'}]",
        "trainer.steps=4", f"trainer.output_dir={tmp_path}", "logging.wandb_mode=disabled",
        "trainer.eval_at_start=false", "trainer.collective_timeout_s=300",
    ]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/multinode_ddp.yaml",
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, *recipe],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    procs[1].communicate(timeout=600)
    died_at = time.monotonic()
    assert procs[1].returncode != 0, "rank 1 was meant to die"
    _, err0 = procs[0].communicate(timeout=600)
    waited = time.monotonic() - died_at
    assert procs[0].returncode != 0, err0[-3000:]
    assert waited < 120, f"machine 0 took {waited:.0f} s to notice (collective timeout 300 s)"
    assert "another process of this job died or stopped responding" in err0, err0[-3000:]


def _trainer_raising(err: BaseException):
    class _Trainer:
        def __init__(self, config):
            raise err

    return _Trainer


@pytest.mark.parametrize("err", [
    ServerUnavailableError("vLLM server at http://127.0.0.1:8000 did not answer POST /generate (timed out)"),
    RuntimeError("request timed out"),
])
def test_main_re_raises_an_error_that_is_not_a_dead_peer_with_its_traceback(err, monkeypatch, capsys):
    monkeypatch.setattr(grpo, "GRPOTrainer", _trainer_raising(err))
    with pytest.raises(type(err)) as raised:
        grpo.main(["trainer.steps=1"])
    assert raised.value is err and raised.traceback[-1].name == "__init__"  # raised where it happened
    assert "another process of this job died" not in capsys.readouterr().err

