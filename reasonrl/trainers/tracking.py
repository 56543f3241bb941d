"""Metrics to the console and to W&B (offline by default: no account, runs land in <output_dir>/wandb)."""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from pathlib import Path

CONSOLE_KEYS = (
    "reward/mean",
    "reward/zero_std_frac",
    "completion/len_mean",
    "policy/entropy",
    "policy/kl",
    "loss/policy",
    "optim/grad_norm",
    "time/step",
    "eval/accuracy",
)


def format_console(step: int, metrics: dict) -> str:
    parts = [f"step {step}"]
    for key in CONSOLE_KEYS:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " | ".join(parts)


class Tracker:
    """Only the main process logs; other ranks get a Tracker with `active=False`.

    `resume_step`: the step of the checkpoint a resumed run restarts from (None: a fresh run). Steps logged after it
    by the interrupted run are dropped from metrics.jsonl and rewound in W&B, so each step is recorded once.
    """

    def __init__(self, *, active: bool, output_dir: str, project: str, mode: str, config: dict, run_name: str,
                 resume_step: int | None = None):
        self.active = active
        self.run = None
        self.history_path = Path(output_dir) / "metrics.jsonl"
        if not active:
            return
        self.history_path.parent.mkdir(parents=True, exist_ok=True)
        keep_history_until(self.history_path, resume_step)
        if mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = _start_wandb_run(wandb, Path(output_dir), resume_step, project=project, name=run_name,
                                    dir=output_dir, mode=mode, config=config)

    def log(self, step: int, metrics: dict, *, console=print) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        with self.history_path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        console(format_console(step, clean))
        if self.run is not None:
            self.run.log({**clean, **_histograms(clean)}, step=step)

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A table of sample completions (prompt, completion, answer, reward)."""
        if self.run is None or not samples:
            return
        import wandb

        columns = list(samples[0])
        table = wandb.Table(columns=["step", *columns], data=[[step, *(s[c] for c in columns)] for s in samples])
        self.run.log({"samples": table}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


LAG_PREFIX = "async/tokens_at_lag_"  # the learner's count of trained tokens at each staleness (learner.py)


def lag_histogram(metrics: dict) -> tuple[list[float], list[float]] | None:
    """(counts, bin edges) of the trained tokens over their staleness 0..k, from the per-lag counts (None if absent)."""
    lags = sorted(int(key.removeprefix(LAG_PREFIX)) for key in metrics if key.startswith(LAG_PREFIX))
    if not lags:
        return None
    return [metrics[f"{LAG_PREFIX}{lag}"] for lag in lags], [lag - 0.5 for lag in lags] + [lags[-1] + 0.5]


def _histograms(metrics: dict) -> dict:
    """W&B histograms: the staleness (policy versions behind the learner) of the step's trained tokens."""
    found = lag_histogram(metrics)
    if found is None:
        return {}
    import wandb

    return {"async/staleness_hist": wandb.Histogram(np_histogram=found)}


def keep_history_until(path: Path, step: int | None) -> None:
    """Drop the rows of metrics.jsonl after `step` (all of them for None: a fresh run), atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [] if step is None else [line for line in lines if _logged_step(line) <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line. A line that does not parse is the tail of a write cut short by a kill:
    later than any checkpoint (a step is logged before it is saved), so it counts as infinitely late."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _start_wandb_run(wandb, run_dir: Path, resume_step: int | None, **init_kwargs):
    """A resumed run rewinds the W&B run of this folder to `resume_step` (`resume_from`: the history after it is
    dropped and logging continues at resume_step + 1; offline, the rewind is recorded and applied by `wandb sync`).
    A fresh run, or a rewind the server refuses (rewinding is a W&B preview feature), starts a new W&B run."""
    id_file = run_dir / "wandb_run_id"
    previous = id_file.read_text().strip() if id_file.is_file() else None
    if resume_step is not None and previous:
        try:
            return wandb.init(resume_from=f"{previous}?_step={resume_step}", **init_kwargs)
        except Exception as err:  # noqa: BLE001 - refused by the server, or the id held by a shared W&B service
            print(f"W&B could not rewind run {previous} to step {resume_step} ({err}); logging to a new W&B run",
                  file=sys.stderr, flush=True)
    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(id=run_id, **init_kwargs)
