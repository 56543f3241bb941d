"""Plot an episode run's curves from its metrics.jsonl: training accuracy and reward, the tool-call rate, turns and
tool calls per episode, and the held-out (greedy) accuracy at its evaluations.

    .venv/bin/python scripts/plot_episodes.py runs/arith/calculator --out docs/img/calculator_arith.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = (  # (title, [(metric, label)])
    ("training samples", [("reward/accuracy", "accuracy"), ("reward/mean", "reward")]),
    ("tool use (training samples)", [("episode/tool_call_rate", "episodes with a tool call"),
                                     ("episode/tool_error_rate", "tool error rate")]),
    ("episode shape", [("episode/turns_mean", "turns"), ("episode/tool_calls_mean", "tool calls")]),
    ("held-out, greedy", [("eval/accuracy", "accuracy"), ("eval/tool_call_rate", "tool-call rate")]),
)


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)], the last value of a step winning (a resumed run logs a step again)."""
    by_step: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    by_step.setdefault(key, {})[int(row["step"])] = float(value)
    return {key: sorted(points.items()) for key, points in by_step.items()}


def plot(series: dict[str, list[tuple[int, float]]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (name, lines) in zip(axes, PANELS):
        for key, label in lines:
            if series.get(key):
                steps, values = zip(*series[key])
                ax.plot(steps, values, marker="o", markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG path (default: RUN/episodes.png)")
    args = parser.parse_args(argv)
    metrics = args.run / "metrics.jsonl"
    if not metrics.is_file():
        parser.error(f"{metrics} does not exist")
    out = args.out or args.run / "episodes.png"
    plot(read_metrics(metrics), out, title=str(args.run))
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
