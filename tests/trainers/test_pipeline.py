"""The producer's worker thread and the samples in flight saved with a checkpoint."""

import threading

import pytest
import torch

from reasonrl.batch import RolloutBatch
from reasonrl.rollout.base import SamplingParams
from reasonrl.trainers.collect import Scored
from reasonrl.trainers.pipeline import ProducerThread, load_results, save_results
from reasonrl.trainers.producer import Plan


def _scored(step: int) -> Scored:
    g = torch.Generator().manual_seed(step)
    batch = RolloutBatch(prompt_ids=[[1, 2], [1, 2]], completion_ids=torch.randint(0, 50, (2, 3), generator=g),
                         completion_mask=torch.tensor([[True, True, False], [True, True, True]]),
                         rollout_logprobs=-torch.rand(2, 3, generator=g), finish_reasons=["stop", "length"],
                         group_size=2, token_versions=torch.tensor([[step, step, 0], [step - 1, step, step]]),
                         sampled_mask=torch.tensor([[True, True, False], [True, False, True]]))  # an episode
    return Scored(rows=[{"question": f"q{step}", "answer": "1"}], batch=batch, texts=["a", "b"],
                  rewards=torch.rand(2, generator=g), valid=torch.tensor([True, False]),
                  per_func={"accuracy": [1.0, float("nan")]}, errors=1, failures={"accuracy": "Traceback ..."},
                  grader_errors=step, episodes=[{"turns": 2, "transcript": "a"}, {"turns": 1, "transcript": "b"}])


def test_results_round_trip_exactly(tmp_path):
    results = {4: _scored(4), 5: _scored(5)}
    save_results(tmp_path, 1, results, num_processes=2)
    back = load_results(tmp_path, 1, num_processes=2)
    assert sorted(back) == [4, 5]
    for step, scored in results.items():
        again = back[step]
        for name in ("completion_ids", "completion_mask", "rollout_logprobs", "token_versions", "sampled_mask"):
            ours, theirs = getattr(again.batch, name), getattr(scored.batch, name)
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name
        assert torch.equal(again.rewards, scored.rewards) and torch.equal(again.valid, scored.valid)
        assert again.rows == scored.rows and again.texts == scored.texts and again.errors == scored.errors
        assert again.grader_errors == scored.grader_errors == step and again.episodes == scored.episodes
        assert again.per_func["accuracy"][0] == 1.0 and again.per_func["accuracy"][1] != again.per_func["accuracy"][1]
    assert load_results(tmp_path, 1, num_processes=4) == {}  # another layout: generated again
    assert load_results(tmp_path, 0, num_processes=2) == {}  # nothing saved for rank 0


def test_plans_run_in_order_and_an_error_reaches_the_learner():
    started = threading.Event()

    def generate_and_score(plan):
        started.set()
        if plan.step == 2:
            raise ConnectionError("the server died")
        return _scored(plan.step + 1)

    worker = ProducerThread(generate_and_score)
    try:
        for step in range(3):
            worker.submit(Plan(step, [], SamplingParams()))
        first, waited = worker.take(0)
        assert waited >= 0 and first.rows[0]["question"] == "q1"
        assert worker.take(1)[0].rows[0]["question"] == "q2"
        with pytest.raises(ConnectionError, match="the server died"):
            worker.take(2)
        with pytest.raises(RuntimeError, match="never planned"):
            worker.take(7)
    finally:
        worker.close()


def test_the_staleness_counts_become_a_wandb_histogram(tmp_path):
    from reasonrl.trainers.tracking import Tracker, lag_histogram

    metrics = {"async/tokens_at_lag_0": 5.0, "async/tokens_at_lag_1": 3.0, "reward/mean": 0.5}
    assert lag_histogram(metrics) == ([5.0, 3.0], [-0.5, 0.5, 1.5])
    assert lag_histogram({"reward/mean": 0.5}) is None
    tracker = Tracker(active=True, output_dir=str(tmp_path), project="t", mode="offline", config={}, run_name="t")
    tracker.log(1, metrics, console=lambda line: None)  # an offline W&B run takes the histogram
    tracker.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*"))
