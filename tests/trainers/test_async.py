"""Asynchronous training (rollout.max_staleness >= 1) against a real `reasonrl serve` process on the tiny model:
per-token versions across an in-flight push, the staleness bound over whole runs, stale samples dropped or
regenerated and counted, resume after kill -9 on exactly the samples generated ahead, and 2 learner processes under
DeepSpeed ZeRO-2 / ZeRO-3 in lockstep, each update equal to a 1-process update on the same batch."""

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import trainer_env
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
from serve_helpers import LOGP_ATOL, kill_server, start_server, teacher_forced

from reasonrl.config import load_config
from reasonrl.rollout.base import SamplingParams
from reasonrl.rollout.server_auth import WEIGHT_TOKEN_ENV
from reasonrl.trainers.pipeline import load_results, results_file, save_results
from reasonrl.trainers.step import group_stats

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOKEN = "async-test-weight-token"
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65]]


@pytest.fixture(scope="module")
def server(vllm_module, vllm_tiny_model_dir, tmp_path_factory, free_port):
    proc, url, _ = start_server(vllm_tiny_model_dir, tmp_path_factory.mktemp("server"), free_port(), token=TOKEN)
    yield url
    kill_server(proc)


def _overrides(model_dir, url, out_dir, *extra) -> list[str]:
    return [
        f"model.name_or_path={model_dir}", "rewards=[{name: 'rewards_for_tests:digit_count'}]",
        "data.num_train=64", "data.num_eval=0", "trainer.eval_at_start=false", "rollout.group_size=4",
        "rollout.prompts_per_step=2", "rollout.max_new_tokens=6", "optim.lr=1e-3", "trainer.save_every=0",
        "trainer.eval_every=0", "logging.wandb_mode=disabled", "rollout.engine=server", f"rollout.server_url={url}",
        f"trainer.output_dir={out_dir}", *extra,
    ]


def _rows(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_push_between_chunks_gives_each_token_the_version_that_sampled_it(server, vllm_tiny_model_dir):
    """inflight_updates: a push lands between two chunks of a generation in progress; tokens before it carry version
    0 and the old weights' log-probs, tokens after it version 1 and the new weights' log-probs."""
    from reasonrl.models import load_model
    from reasonrl.rollout.server_engine import ServerEngine

    old = load_model(vllm_tiny_model_dir, dtype="float32").eval()
    new = load_model(vllm_tiny_model_dir, dtype="float32").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.3 * torch.randn_like(p))
    engine = ServerEngine(server, eos_token_ids=[old.config.eos_token_id], token=TOKEN, timeout_s=120,
                          chunk_tokens=3)
    try:
        engine.load_weights(old.named_parameters())  # the server starts from the base weights: version 0 = old
        result = {}
        params = SamplingParams(n=2, temperature=1.0, seed=5)
        worker = threading.Thread(target=lambda: result.update(out=engine.generate(PROMPTS, params, [12] * 3)))
        worker.start()
        deadline = time.monotonic() + 60
        while engine.gate._chunks == 0 and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)  # the first chunk is generating
        with engine.gate.update(1):
            engine.load_weights(new.named_parameters())
        worker.join(120)
        out = result["out"]
    finally:
        engine.close()
    prompts = [p for p in PROMPTS for _ in range(params.n)]
    assert any(0 in v and 1 in v for v in out.versions), out.versions  # some samples changed weights mid-way
    for prompt, ids, logps, versions in zip(prompts, out.completion_ids, out.logprobs, out.versions):
        assert len(versions) == len(ids) and versions == sorted(versions) and versions[:3] == [0] * min(3, len(ids))
        if not ids:
            continue
        expected = torch.where(torch.tensor(versions) == 0, teacher_forced(old, prompt, ids),
                               teacher_forced(new, prompt, ids))
        torch.testing.assert_close(torch.tensor(logps, dtype=torch.float64), expected, atol=LOGP_ATOL, rtol=0)


@pytest.mark.parametrize("extra", [
    ["rollout.max_staleness=1", "rollout.inflight_updates=true", "rollout.inflight_chunk_tokens=2"],
    ["rollout.max_staleness=2", "algorithm.dynamic_sampling.enabled=true", "rollout.stale=regenerate"],
], ids=["k1-inflight", "k2-drain-dapo"])
def test_async_runs_never_train_a_token_older_than_the_bound(server, vllm_tiny_model_dir, tmp_path, monkeypatch,
                                                             extra):
    from reasonrl.trainers import grpo

    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv(WEIGHT_TOKEN_ENV, TOKEN)
    k = int(extra[0].split("=")[1])
    assert grpo.main(_overrides(vllm_tiny_model_dir, server, tmp_path, "trainer.steps=5", *extra)) == 0
    rows = [r for r in _rows(tmp_path) if "reward/mean" in r]
    assert len(rows) == 5
    for row in rows:
        lags = [row.get(f"async/tokens_at_lag_{lag}", 0.0) for lag in range(k + 1)]
        assert sum(lags) == row["train/loss_tokens"]  # every trained token has a version within k
        assert row["async/staleness_max"] <= k and row["async/dropped"] == 0
        assert row["sync/prob_gap_max"] < 1e-3  # each push put the learner's weights into the server
        assert row["async/learner_wait_s"] >= 0 and row["async/producer_wait_s"] >= 0
    assert rows[0]["async/staleness_max"] == 0  # step 0 samples with the weights it starts from
    assert max(r["async/staleness_max"] for r in rows[1:]) >= 1  # later steps trained on samples generated ahead


def test_stale_samples_are_dropped_or_regenerated_and_counted(server, vllm_tiny_model_dir, tmp_path, monkeypatch):
    """A round generated at version 0 and trained at version 3 with k = 1: every sample is too old."""
    from reasonrl.trainers.grpo import GRPOTrainer

    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv(WEIGHT_TOKEN_ENV, TOKEN)
    config = load_config(REPO / "recipes" / "tiny_smoke.yaml",
                         _overrides(vllm_tiny_model_dir, server, tmp_path, "rollout.max_staleness=1"))
    trainer = GRPOTrainer(config)
    try:
        producer = trainer.producer
        old = producer.generate_and_score(producer.plan(0))
        assert (old.batch.token_versions[old.batch.completion_mask] == 0).all()
        producer.publish(trainer.learner.weights(), step=3)  # the engine now holds version 3
        kept, metrics = producer.within_staleness(3, old)
        assert metrics == {"async/dropped": 8.0, "async/regenerated": 0.0} and not kept.valid.any()
        config.rollout.stale = "regenerate"
        old = producer.generate_and_score(producer.plan(0))  # versions are set by the engine: 3 now
        old.batch.token_versions[:4] = 1  # the first group is 2 versions old, the second is not
        fresh, metrics = producer.within_staleness(3, old)
        assert metrics == {"async/dropped": 0.0, "async/regenerated": 4.0}
        assert fresh.valid.all() and (fresh.batch.token_versions[fresh.batch.completion_mask] == 3).all()
        assert [row["question"] for row in fresh.rows] == [row["question"] for row in old.rows[::-1]]
    finally:
        trainer.close()


def _command(model_dir, url, out_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "reasonrl.trainers.grpo", "--config", str(REPO / "recipes" / "tiny_smoke.yaml"),
            *_overrides(model_dir, url, out_dir, *extra)]


def test_resume_after_kill_9_trains_on_the_samples_generated_ahead(server, vllm_tiny_model_dir, tmp_path):
    """kill -9 while the worker scores step 4's round (k = 1, a checkpoint every 2 steps): the checkpoint of step 2
    holds step 3's round, generated ahead; the resumed run trains step 3 on exactly it, and logs each step once."""
    out = tmp_path / "run"
    run = _command(vllm_tiny_model_dir, server, out, "trainer.steps=6", "trainer.save_every=2", "trainer.keep_last=0",
                   "rollout.max_staleness=1", "rollout.inflight_updates=true", "rollout.inflight_chunk_tokens=2",
                   "rewards=[{name: 'resume_rewards:digit_count_stalling'}]")
    marker = tmp_path / "stalled"
    env = trainer_env(HERE, OMP_NUM_THREADS="1", **{WEIGHT_TOKEN_ENV: TOKEN})
    with open(tmp_path / "killed.log", "w") as log:  # reward call 5 scores step 4's round
        proc = subprocess.Popen(run, stdout=log, stderr=subprocess.STDOUT,
                                env={**env, "REASONRL_STALL_AT_CALL": "5", "REASONRL_STALL_MARKER": str(marker)})
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=60)
    assert marker.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    checkpoint = out / "checkpoints" / "step-000002"
    ahead = load_results(checkpoint, 0, num_processes=1)
    assert sorted(ahead) == [2]  # the round of step 3 (index 2), generated before the checkpoint
    done = subprocess.run([*run, "trainer.resume=auto"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "at step 2" in done.stdout
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    saved = ahead[2]
    expected = group_stats(saved.rewards, saved.valid, 4)["reward/mean"]
    assert rows[2]["reward/mean"] == pytest.approx(expected, abs=1e-6)  # step 3 trained on the saved round


@pytest.mark.parametrize("layout", ["zero2", "zero3"])
def test_two_learners_under_zero_match_one_process_on_the_same_batches(server, vllm_tiny_model_dir, tmp_path, layout):
    """2 learner processes under DeepSpeed ZeRO (gloo) with the server, k = 1: the run checks that both ranks hold
    the same parameters at the end (it fails otherwise); and step 2's update equals a 1-process run's that resumes
    from the step-1 checkpoint and trains on the same batch, the two ranks' rounds saved in it."""
    out = tmp_path / "two"
    steps = ["trainer.steps=2", "trainer.save_every=1", "trainer.keep_last=0", "rollout.max_staleness=1",
             "rollout.inflight_updates=true", "rollout.inflight_chunk_tokens=2", "rollout.prompts_per_step=4"]
    env = trainer_env(HERE, OMP_NUM_THREADS="1", **{WEIGHT_TOKEN_ENV: TOKEN})
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"recipes/accelerate/{layout}.yaml",
              "--num_processes", "2", "-m", "reasonrl.trainers.grpo", "--config",
              str(REPO / "recipes" / "tiny_smoke.yaml"), *_overrides(vllm_tiny_model_dir, server, out, *steps)]
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "eval_results.json").read_text())
    assert summary["ranks_identical"] and summary["num_processes"] == 2
    assert all(r["async/staleness_max"] <= 1 for r in _rows(out))
    # the same batch on one process: step 1's checkpoint, with both ranks' rounds of step 2 as one rank's
    one = tmp_path / "one"
    shutil.copytree(out / "checkpoints" / "step-000001", one / "checkpoints" / "step-000001")
    saved = [load_results(out / "checkpoints" / "step-000001", rank, num_processes=2)[1] for rank in (0, 1)]
    for rank in (0, 1):
        results_file(one / "checkpoints" / "step-000001", rank).unlink()
    from reasonrl.trainers.collect import concat_scored

    save_results(one / "checkpoints" / "step-000001", 0, {1: concat_scored(saved)}, num_processes=1)
    replay = subprocess.run([*_command(vllm_tiny_model_dir, server, one, *steps), "trainer.resume=auto"], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-2000:]
    ours, theirs = _rows(one)[-1], _rows(out)[-1]
    assert ours["reward/mean"] == theirs["reward/mean"]
    torch.testing.assert_close(ours["loss/policy"], theirs["loss/policy"], rtol=1e-5, atol=1e-7)
    two_weights = load_file(str(out / "checkpoints" / "step-000002" / "model" / "model.safetensors"))
    one_weights = load_file(str(one / "checkpoints" / "step-000002" / "model" / "model.safetensors"))
    assert two_weights.keys() == one_weights.keys()
    moved = 0.0
    before = load_file(str(out / "checkpoints" / "step-000001" / "model" / "model.safetensors"))
    for name, value in two_weights.items():
        torch.testing.assert_close(one_weights[name], value, rtol=0, atol=5e-6, msg=name)
        moved = max(moved, float((value - before[name]).abs().max()))
    assert moved > 1e-4  # the step did update the weights


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_server_ends_an_async_run_within_the_timeout(vllm_module, vllm_tiny_model_dir, tmp_path,
                                                                    free_port, how):
    """The server killed (dead) or stopped (hung) while an async run generates ahead and pushes: the run exits with
    the server's error within rollout.server_timeout_s (plus start-up slack), never a hang."""
    import signal

    from serve_helpers import signal_server

    (tmp_path / "server").mkdir()
    proc, url, _ = start_server(vllm_tiny_model_dir, tmp_path / "server", free_port(), token=TOKEN)
    timeout_s = 20
    out = tmp_path / "run"
    run = _command(vllm_tiny_model_dir, url, out, "trainer.steps=400", "rollout.max_staleness=1",
                   "rollout.inflight_updates=true", "rollout.inflight_chunk_tokens=2",
                   f"rollout.server_timeout_s={timeout_s}")
    env = trainer_env(HERE, OMP_NUM_THREADS="1", **{WEIGHT_TOKEN_ENV: TOKEN})
    try:
        with open(tmp_path / "trainer.log", "w") as log:
            trainer = subprocess.Popen(run, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and trainer.poll() is None and not (
                    (out / "metrics.jsonl").exists() and len(_rows(out)) >= 2):
                time.sleep(0.2)
            assert trainer.poll() is None, (tmp_path / "trainer.log").read_text()[-3000:]
            signal_server(proc, getattr(signal, how))
            t0 = time.monotonic()
            try:
                code = trainer.wait(timeout=2 * timeout_s + 30)
            finally:
                trainer.kill()
            took = time.monotonic() - t0
    finally:
        signal_server(proc, signal.SIGCONT)
        kill_server(proc)
    text = (tmp_path / "trainer.log").read_text()
    assert code != 0 and took < timeout_s + 30, (code, took, text[-3000:])
    assert "vLLM server at" in text or "weight push to" in text, text[-3000:]
