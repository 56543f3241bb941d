"""Metrics to the console and to W&B (offline by default: no account, runs land in <output_dir>/wandb)."""

from __future__ import annotations

import json
import os
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
    """Only the main process logs; other ranks get a Tracker with `active=False`."""

    def __init__(self, *, active: bool, output_dir: str, project: str, mode: str, config: dict, run_name: str):
        self.active = active
        self.run = None
        self.history_path = Path(output_dir) / "metrics.jsonl"
        if not active or mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_dir = Path(output_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project, name=run_name, dir=str(wandb_dir), mode=mode, config=config, resume="allow",
            id=_stable_run_id(wandb_dir),
        )

    def log(self, step: int, metrics: dict, *, console=print) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        with self.history_path.open("a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")
        console(format_console(step, clean))
        if self.run is not None:
            self.run.log(clean, step=step)

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


def _stable_run_id(run_dir: Path) -> str:
    """One W&B run id per output folder, so a resumed run continues the same W&B run."""
    id_file = run_dir / "wandb_run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return run_id
