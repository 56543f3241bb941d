"""Asynchronous training: the producer generates up to `rollout.max_staleness` steps ahead of the learner.

The main thread plans each step's first round (`Producer.plan`: prompts, efforts, budgets, seeds, the sampling
statistics of the moment) and submits it; a worker thread generates and scores the plans in order
(`Producer.generate_and_score`: the engine and the reward functions, no collective operation), and the learner
takes each step's result when it needs it. Plan t + k is submitted at the start of step t, once the weights of
version t are in the engine, so every token of step t + k's first round is sampled by version t or later: at most
k versions behind the learner that trains on it (DAPO's refill rounds and regenerated samples are sampled at
train time, by the newest weights). A checkpoint waits for the plans in flight and saves their results
(`save_results` / `load_results`), so a resumed run trains on exactly the samples it would have.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path

import torch

from reasonrl.batch import RolloutBatch
from reasonrl.trainers.collect import Scored


class ProducerThread:
    """Runs `generate_and_score(plan)` for submitted plans, in order, in a daemon thread; `take(step)` waits for one.

    An error in the worker (a dead server, a reward function that raises under strict_rewards) is raised by the
    next `take`; `idle_s` is the worker's time spent waiting for a plan (the producer's idle time)."""

    def __init__(self, generate_and_score):
        self._generate_and_score = generate_and_score
        self._plans: queue.SimpleQueue = queue.SimpleQueue()
        self._results: dict[int, Scored] = {}
        self._submitted: set[int] = set()
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self.idle_s = 0.0
        self._thread = threading.Thread(target=self._work, name="reasonrl-producer", daemon=True)
        self._thread.start()

    def submit(self, plan) -> None:
        with self._cond:
            self._submitted.add(plan.step)
        self._plans.put(plan)

    def put_result(self, step: int, scored: Scored) -> None:
        """A result generated earlier (restored from a checkpoint)."""
        with self._cond:
            self._submitted.add(step)
            self._results[step] = scored
            self._cond.notify_all()

    def has(self, step: int) -> bool:
        """Whether `step` was submitted or restored (and not taken yet)."""
        with self._cond:
            return step in self._submitted

    def take(self, step: int) -> tuple[Scored, float]:
        """(step's result, seconds waited for it)."""
        t0 = time.perf_counter()
        with self._cond:
            if step not in self._submitted:
                raise RuntimeError(f"step {step} was never planned")
            self._cond.wait_for(lambda: step in self._results or self._error is not None)
            if step not in self._results:
                raise self._error
            self._submitted.discard(step)
            return self._results.pop(step), time.perf_counter() - t0

    def finished_results(self) -> dict[int, Scored]:
        """Every submitted plan's result once all are done (a checkpoint's samples in flight), not taken."""
        with self._cond:
            self._cond.wait_for(lambda: self._submitted <= set(self._results) or self._error is not None)
            if self._error is not None:
                raise self._error
            return dict(self._results)

    def close(self, timeout_s: float = 5.0) -> None:
        self._plans.put(None)
        self._thread.join(timeout_s)

    def _work(self) -> None:
        while True:
            t0 = time.perf_counter()
            plan = self._plans.get()
            self.idle_s += time.perf_counter() - t0
            if plan is None:
                return
            try:
                scored = self._generate_and_score(plan)
            except BaseException as err:  # noqa: BLE001 - raised in the main thread by take()
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self._results[plan.step] = scored
                self._cond.notify_all()


# ---------------------------------------------------------------------------------------------------- checkpoints
_TENSORS = ("completion_ids", "completion_mask", "rollout_logprobs", "rollout_entropy", "token_versions",
            "sampled_mask")


def scored_to_json(scored: Scored) -> dict:
    """A JSON-able copy of a scored round (lists of numbers: float32 and int64 values round-trip exactly)."""
    b = scored.batch
    tensors = {name: getattr(b, name) for name in _TENSORS if getattr(b, name) is not None}
    return {
        "rows": scored.rows, "texts": scored.texts, "rewards": scored.rewards.tolist(),
        "valid": scored.valid.tolist(), "per_func": scored.per_func, "errors": scored.errors,
        "failures": scored.failures, "grader_errors": scored.grader_errors, "prompt_ids": b.prompt_ids,
        "finish_reasons": b.finish_reasons,
        "group_size": b.group_size, "episodes": scored.episodes,
        "tensors": {name: {"dtype": str(t.dtype).removeprefix("torch."), "values": t.tolist()}
                    for name, t in tensors.items()},
    }


def scored_from_json(data: dict) -> Scored:
    tensors = {name: torch.tensor(t["values"], dtype=getattr(torch, t["dtype"]))
               for name, t in data["tensors"].items()}
    batch = RolloutBatch(prompt_ids=data["prompt_ids"], finish_reasons=data["finish_reasons"],
                         group_size=data["group_size"], completion_ids=tensors["completion_ids"],
                         completion_mask=tensors["completion_mask"],
                         rollout_logprobs=tensors.get("rollout_logprobs"),
                         rollout_entropy=tensors.get("rollout_entropy"), token_versions=tensors.get("token_versions"),
                         sampled_mask=tensors.get("sampled_mask"))
    return Scored(rows=data["rows"], batch=batch, texts=data["texts"],
                  rewards=torch.tensor(data["rewards"], dtype=torch.float32), valid=torch.tensor(data["valid"]),
                  per_func=data["per_func"], errors=data["errors"], failures=data["failures"],
                  grader_errors=data["grader_errors"], episodes=data.get("episodes"))


def results_file(folder: Path, rank: int) -> Path:
    return folder / f"in_flight-rank{rank}.json"


def save_results(folder: Path, rank: int, results: dict[int, Scored], *, num_processes: int) -> None:
    data = {"num_processes": num_processes, "steps": {str(step): scored_to_json(s) for step, s in results.items()}}
    results_file(folder, rank).write_text(json.dumps(data))


def load_results(folder: Path, rank: int, *, num_processes: int) -> dict[int, Scored]:
    """This rank's saved samples in flight; none when the run resumes on another number of processes (the plans
    are then generated again, with the resumed weights)."""
    path = results_file(folder, rank)
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data["num_processes"] != num_processes:
        return {}
    return {int(step): scored_from_json(s) for step, s in data["steps"].items()}
