"""Greedy accuracy vs mean completion length: one or more models/checkpoints evaluated on a task at several length
budgets (max_new_tokens) and/or e1 effort values, as a markdown table and a PNG of the accuracy-vs-mean-length curve
with every model on the same axes.

    .venv/bin/python scripts/length_accuracy.py --models base=smollm2-135m-instruct trained=runs/arith/rmt \\
        --budgets 16,32,64 --efforts 0.25,0.5,1.0
    .venv/bin/python scripts/length_accuracy.py --models runs/gsm8k/e1 --task gsm8k --data-path test.jsonl \\
        --budgets 128,256,512 --engine vllm --json --png runs/gsm8k_length.png

--models takes label=target pairs (a bare target is labelled by itself); a target is what `reasonrl eval` takes: a
run folder (its latest checkpoint), a checkpoint folder, a local HF folder, a hub id or a built-in name. Each budget
is evaluated without an effort line; each effort (--efforts) is evaluated at the largest budget. The held-out rows,
model loading and scoring are those of `reasonrl eval` (`eval_data_config`, `resolve_eval_model`, `load_eval_model`,
`greedy_accuracy`). With --json the last line is one JSON object {"rows": [...], "png": path}; --from-json reads
such outputs back (their last JSON line), so earlier measurements join the table and the plot without re-running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reasonrl.cli import TASKS, close_engine, effort_arg


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
    return values


def effort_list(text: str) -> list[float]:
    values = [effort_arg(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated efforts in (0, 1]")
    return values


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    """label=target pairs; a bare target is labelled by itself."""
    models = []
    for spec in specs:
        label, sep, target = spec.partition("=")
        models.append((label, target) if sep and label and target else (spec, spec))
    return models


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=[], help="label=target pairs (or bare targets)")
    p.add_argument("--from-json", nargs="+", default=[], metavar="FILE",
                   help="earlier --json outputs (logs whose last JSON line holds the rows) to include")
    p.add_argument("--task", choices=TASKS, default="arithmetic")
    p.add_argument("--data-path", help="gsm8k: local JSONL file (default: the hub data set openai/gsm8k)")
    p.add_argument("--n", type=int, default=200, help="number of held-out problems")
    p.add_argument("--budgets", type=int_list, help="max_new_tokens values (default: --max-new-tokens)")
    p.add_argument("--efforts", type=effort_list, help="e1 efforts, each evaluated at the largest budget")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--answer-mode", default="lenient", choices=["lenient", "hash", "boxed", "last_number"])
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])  # a server serves one model, not --models
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--png", default=str(REPO / "runs" / "length_accuracy.png"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not args.models and not args.from_json:
        p.error("give --models, --from-json or both")
    args.budgets = args.budgets or [args.max_new_tokens]
    args.config, args.overrides = None, []  # what eval_data_config reads besides task/data_path/n
    return args


def settings(args) -> list[tuple[str, int, float | None]]:
    """(setting label, max_new_tokens, effort) in evaluation order."""
    out = [(f"budget {b}", b, None) for b in args.budgets]
    out += [(f"effort {r:g}", max(args.budgets), r) for r in args.efforts or []]
    return out


def evaluate_model(args, label: str, target: str, rows: list[dict], template: str) -> list[dict]:
    """One table row per setting; the engine (built like `reasonrl eval`'s) is closed afterwards."""
    from reasonrl.cli import build_cli_engine, cli_rollout_config, resolve_eval_model
    from reasonrl.models import load_tokenizer

    model_path = resolve_eval_model(target)
    tokenizer = load_tokenizer(model_path)
    engine = build_cli_engine(cli_rollout_config(args), model_path, tokenizer, dtype=args.dtype)
    results = []
    try:
        for setting, budget, effort in settings(args):
            row = {"model": label, "target": target, "model_path": model_path, "setting": setting,
                   **evaluate_setting(args, engine, tokenizer, rows, template, budget, effort)}
            print(f"{label} {setting}: accuracy {row['accuracy']:.1%}, mean length {row['mean_length']:.1f}",
                  file=sys.stderr, flush=True)
            results.append(row)
    finally:
        close_engine(engine)
    return results


def evaluate_setting(args, engine, tokenizer, rows, template, budget: int, effort: float | None) -> dict:
    """Greedy accuracy and mean length at one budget / effort."""
    from reasonrl.trainers.evaluate import greedy_accuracy

    start = time.perf_counter()
    r = greedy_accuracy(engine, tokenizer, rows, template=template, max_new_tokens=budget,
                        answer_mode=args.answer_mode, effort=effort)
    n = max(r["n"], 1)
    return {"engine": args.engine, "max_new_tokens": budget, "effort": effort, "n": int(r["n"]),
            "accuracy": r["correct"] / n, "mean_length": r["tokens"] / n,
            "seconds": round(time.perf_counter() - start, 1)}


def load_rows(path: str) -> list[dict]:
    """The rows of an earlier --json run: the last line of `path` that is a JSON object with "rows"."""
    for line in reversed(Path(path).read_text().splitlines()):
        if line.startswith("{"):
            try:
                rows = json.loads(line)["rows"]
            except (json.JSONDecodeError, KeyError):
                continue
            return rows
    raise SystemExit(f"{path}: no JSON line with \"rows\" (was it written with --json?)")


def point_labels(points: list[tuple[float, float, str]]) -> dict[tuple[float, float], str]:
    """One label per drawn point: settings that land on the same spot are joined ("16,32,64")."""
    labels: dict[tuple[float, float], list[str]] = {}
    for x, y, setting in points:
        short = setting.replace("budget ", "").replace("effort ", "r=")
        labels.setdefault((round(x, 1), round(y, 3)), []).append(short)
    return {xy: ",".join(names) for xy, names in labels.items()}


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r["mean_length"], r["accuracy"], r["setting"]) for r in rows if r["model"] == label)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker="o", label=label)
        for (x, y), text in point_labels(points).items():
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("mean completion length (tokens)")
    ax.set_ylabel("greedy accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from reasonrl.cli import eval_data_config
    from reasonrl.data.tasks import load_task_rows

    rows = [row for path in args.from_json for row in load_rows(path)]
    if args.models:
        data = eval_data_config(args)
        _, eval_rows = load_task_rows(data)
        for label, target in parse_models(args.models):
            try:
                rows += evaluate_model(args, label, target, eval_rows, data.template)
            except ValueError as err:  # e.g. a LoRA checkpoint with --engine vllm
                raise SystemExit(f"{target}: {err}") from err
    sizes = sorted({r["n"] for r in rows})
    plot(rows, args.png, f"{args.task}: accuracy vs length (n={'/'.join(map(str, sizes))})")
    print("| model | setting | accuracy | mean length |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['setting']} | {r['accuracy']:.1%} | {r['mean_length']:.1f} |")
    print(f"plot: {args.png}")
    if args.json:
        print(json.dumps({"rows": rows, "png": args.png}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
