"""Ablation of the algorithm recipes on one task: the same steps and seeds for each, one table and one plot.

    .venv/bin/python scripts/ablate.py --task arith --seeds 0 1 --steps 12 --eval-every 3 --target 0.15
    .venv/bin/python scripts/ablate.py --report runs/ablate/arith      # table and plot of finished runs only

Each run is `reasonrl.trainers.grpo` on `recipes/<task>/<algo>.yaml` with `trainer.seed`, `trainer.steps`,
`trainer.eval_every` (and any `--set key=value`) overridden, in `<out>/<algo>/seed<k>`; a run that already finished
there is not repeated. The table (also as one JSON object on the last line with --json) holds per algorithm, averaged
over seeds: final and best greedy eval accuracy, steps and wall time to reach --target, loss tokens per step in the
first quarter of the run (D3S's saving) and over the whole run, and mean completion length. The PNG plots eval
accuracy against steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = ["grpo", "dr_grpo", "dapo", "hapo", "d3s", "hapo_d3s"]


def run_one(task: str, algo: str, seed: int, out: Path, args) -> None:
    if (out / "eval_results.json").is_file():
        print(f"[ablate] {algo} seed {seed}: already done in {out}", flush=True)
        return
    if out.exists():  # an interrupted run: start it again from scratch
        shutil.rmtree(out)
    cmd = [
        sys.executable, "-m", "reasonrl.trainers.grpo", "--config", str(REPO / "recipes" / task / f"{algo}.yaml"),
        f"trainer.seed={seed}", f"trainer.steps={args.steps}", f"trainer.eval_every={args.eval_every}",
        f"trainer.output_dir={out}", "trainer.save_every=0", "trainer.keep_last=1",
        f"logging.wandb_mode={args.wandb}", *args.set,
    ]
    print(f"[ablate] {algo} seed {seed}: {' '.join(cmd[2:])}", flush=True)
    log = out.parent / f"seed{seed}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ.copy()
    if args.parallel > 1:  # never oversubscribe the cores: each run gets its share of threads
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
    with log.open("w") as f:
        done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"[ablate] {algo} seed {seed} failed (exit {done.returncode}); see {log}")


def read_run(path: Path) -> dict:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    steps = [r for r in rows if "time/step" in r]
    elapsed, clock = {}, 0.0
    for r in steps:
        clock += r["time/step"]
        elapsed[r["step"]] = clock
    return {"evals": evals, "steps": steps, "elapsed": elapsed}


def summarize(runs: list[dict], target: float, total_steps: int) -> dict:
    def mean(values):
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    reached = []
    for run in runs:
        hit = next((s for s, acc in run["evals"] if s > 0 and acc >= target), None)
        reached.append((hit, run["elapsed"].get(hit) if hit else None))
    early = max(1, total_steps // 4)
    return {
        "seeds": len(runs),
        "final_acc": mean([run["evals"][-1][1] for run in runs]),
        "best_acc": mean([max(acc for _, acc in run["evals"]) for run in runs]),
        "base_acc": mean([run["evals"][0][1] for run in runs if run["evals"] and run["evals"][0][0] == 0]),
        "reached_target": sum(hit is not None for hit, _ in reached),
        "steps_to_target": mean([hit for hit, _ in reached]),
        "seconds_to_target": mean([sec for _, sec in reached]),
        "tokens_per_step_early": mean([statistics.fmean(r["train/loss_tokens"] for r in run["steps"][:early])
                                       for run in runs]),
        "tokens_per_step": mean([statistics.fmean(r["train/loss_tokens"] for r in run["steps"]) for run in runs]),
        "completion_len": mean([statistics.fmean(r["completion/len_mean"] for r in run["steps"]) for run in runs]),
        "seconds_per_step": mean([statistics.fmean(r["time/step"] for r in run["steps"]) for run in runs]),
    }


def format_table(table: dict, target: float) -> str:
    cols = [("algorithm", None), ("seeds", "{:d}"), ("base acc", "{:.1%}"), ("final acc", "{:.1%}"),
            ("best acc", "{:.1%}"), (f"reached {target:.0%}", "{:d}"), ("steps to it", "{:.1f}"),
            ("s to it", "{:.0f}"), ("loss tok/step (1st 1/4)", "{:.0f}"), ("loss tok/step", "{:.0f}"),
            ("mean len", "{:.1f}"), ("s/step", "{:.1f}")]
    keys = ["seeds", "base_acc", "final_acc", "best_acc", "reached_target", "steps_to_target", "seconds_to_target",
            "tokens_per_step_early", "tokens_per_step", "completion_len", "seconds_per_step"]
    lines = ["| " + " | ".join(name for name, _ in cols) + " |", "|" + "---|" * len(cols)]
    for algo, row in table.items():
        cells = [algo] + [("-" if row[k] is None else fmt.format(row[k])) for k, (_, fmt) in zip(keys, cols[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(all_runs: dict[str, list[dict]], path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algo, runs in all_runs.items():
        steps = sorted({s for run in runs for s, _ in run["evals"]})
        means = [statistics.fmean(acc for run in runs for s2, acc in run["evals"] if s2 == s) for s in steps]
        ax.plot(steps, means, marker="o", label=f"{algo} ({len(runs)} seeds)")
    ax.set_xlabel("training step")
    ax.set_ylabel("greedy eval accuracy")
    ax.set_title(f"reasonrl ablation: {task}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="arith", choices=["arith", "gsm8k"])
    parser.add_argument("--algos", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.15, help="eval accuracy whose first crossing is timed")
    parser.add_argument("--out", default=None, help="default: runs/ablate/<task>")
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--wandb", default="disabled", choices=["offline", "online", "disabled"])
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (threads split between them)")
    parser.add_argument("--report", default=None, help="only read the finished runs under this folder")
    parser.add_argument("--json", action="store_true", help="print the table as one JSON object on the last line")
    args = parser.parse_args(argv)
    out = Path(args.report or args.out or REPO / "runs" / "ablate" / args.task)
    if not args.report:
        jobs = [(algo, seed) for seed in args.seeds for algo in args.algos]
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            for future in [pool.submit(run_one, args.task, a, s, out / a / f"seed{s}", args) for a, s in jobs]:
                future.result()
    all_runs = {}
    for algo in args.algos:
        finished = [out / algo / f"seed{s}" for s in args.seeds if (out / algo / f"seed{s}" / "eval_results.json").is_file()]
        if finished:
            all_runs[algo] = [read_run(p) for p in finished]
    if not all_runs:
        raise SystemExit(f"no finished runs under {out}")
    table = {algo: summarize(runs, args.target, args.steps) for algo, runs in all_runs.items()}
    print(format_table(table, args.target))
    png = out / "ablation.png"
    plot(all_runs, png, args.task)
    print(f"plot: {png}")
    if args.json:
        print(json.dumps({"task": args.task, "steps": args.steps, "target": args.target, "table": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
