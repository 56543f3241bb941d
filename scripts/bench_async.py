"""Asynchronous vs synchronous training throughput on the default task (recipes/grpo_smollm2_arith.yaml: SmolLM2-135M,
2-digit arithmetic, 16 prompts x 8 samples per step), the same seeds in every row.

    .venv/bin/python scripts/bench_async.py                          # all rows, 12 steps each (long: about an hour)
    .venv/bin/python scripts/bench_async.py --rows sync,async_k1 --steps 4 --json
    .venv/bin/python scripts/bench_async.py --steps 1 --num-eval 4 --rows sync,async_k1 --json   # smoke run

Each row is a fresh `reasonrl train` subprocess with its own output folder under a temporary directory, with
`trainer.steps=N trainer.save_every=0 trainer.output_dir=... logging.wandb_mode=disabled` (offline where the schema
has no disabled mode):

- `sync`: the recipe as it is (rollout.engine=vllm inside the trainer, both cores), rollout.max_staleness=0.
- `sync_server`: rollout.engine=server, max_staleness=0, the server pinned to one core and the trainer to the other
  (a reference row: where the time goes when generation and learning alternate across two processes).
- `async_k1`, `async_k2`: rollout.engine=server, rollout.max_staleness=1 / 2, pinned like `sync_server`.
- `async_k1_shared`: as `async_k1`, but the trainer runs on both cores (the server still on core 1 only): the
  learner is the bottleneck on this task, and the server idles most of each step.

Pinning: the server runs under `taskset -c <core 1>` with `VLLM_CPU_OMP_THREADS_BIND=<core 1>` and one OpenMP
thread; the trainer under `taskset -c <core 0>` with OMP_NUM_THREADS=MKL_NUM_THREADS=1 (torch takes its thread count
from them). The two cores are the first two this process may run on. Every server row starts its own
`reasonrl serve` (in the trainer's resolved model.dtype, a fresh weight token in a file, the recipe's KV-cache size, a free port), so every row starts
from the base weights; the server's process group is killed at the end of its row, also on error. Server start-up is
not part of the trainer's wall time (its own column).

Per row, from `<out>/metrics.jsonl` (the rows that have `time/step`) and `<out>/eval_results.json`: samples/s =
steps x prompts_per_step x group_size / sum of time/step, the subprocess's wall time, the sums of time/generate,
time/train, async/learner_wait_s and async/producer_wait_s, the mean and max of async/staleness_mean /
async/staleness_max, the sum of async/dropped (async keys are absent, "-", in synchronous rows), and the greedy
accuracy on the held-out problems at step 0 and at the end. A markdown table goes to stdout; with --json the last
line is one JSON object (`sync_samples_per_s`, `async_k1_samples_per_s`, ..., `async_k1_vs_sync`, the rows). A row
that fails prints the tail of its stderr (and of the server log); the other rows still run, and the script exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "grpo_smollm2_arith.yaml"
MODEL = "smollm2-135m-instruct"
ROWS = {  # name: (engine, max_staleness, pinned)
    "sync": ("vllm", 0, False),
    "sync_server": ("server", 0, True),
    "async_k1": ("server", 1, True),
    "async_k2": ("server", 2, True),
    "async_k1_shared": ("server", 1, False),  # the trainer on both cores, the server on one of them
}
SERVER_START_TIMEOUT_S = 600  # vLLM's start on one busy core: a minute or more
TAIL_CHARS = 3000


class RowFailed(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def kill_group(proc: subprocess.Popen | None, grace_s: float = 20.0) -> None:
    """SIGTERM to the process group of ``proc`` (vLLM's engine process included), SIGKILL after ``grace_s``."""
    if proc is None or proc.poll() is not None:
        if proc is not None:
            try:  # the leader is gone; children of its group may not be
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 60.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # whatever of the group outlived its leader
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def machine_kind() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    isa = ("AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else
           "AVX2" if "avx2" in flags else "no AVX2")
    return f"{model}, {isa}, {len(os.sched_getaffinity(0))} usable cores"


def wandb_override() -> str:
    from reasonrl.config import LoggingConfig

    f = next(f for f in dataclasses.fields(LoggingConfig) if f.name == "wandb_mode")
    return "disabled" if "disabled" in f.metadata.get("choices", ()) else "offline"


def pinned_env(base: dict, core: int, *, vllm: bool) -> dict:
    env = dict(base, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if vllm:
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
    return env


# -------------------------------------------------------------------------------------------------------- server
def start_server(folder: Path, core: int, token: str, rollout, dtype: str) -> tuple[subprocess.Popen, str, float]:
    """A healthy `reasonrl serve` pinned to ``core``, generating in ``dtype`` (the trainer's resolved model.dtype, as
    the in-process engine does): ``(process, url, start-up seconds)``."""
    from reasonrl.models import resolve_model_path
    from reasonrl.rollout.server_auth import API_KEY_ENV, WEIGHT_TOKEN_ENV, WEIGHT_TOKEN_FILE_ENV
    from reasonrl.rollout.server_engine import ServerClient, ServerUnavailableError
    from reasonrl.rollout.vllm_engine import CPU_MAX_NUM_SEQS

    token_file = folder / "weight-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_port()
    passthrough = []  # the in-process engine's memory settings of the recipe, so that the rows differ in hosting only
    if rollout.vllm_kv_cache_bytes:
        passthrough += ["--kv-cache-memory-bytes", str(rollout.vllm_kv_cache_bytes)]
    batch = rollout.prompts_per_step * rollout.group_size
    if rollout.vllm_max_num_seqs or batch > CPU_MAX_NUM_SEQS:
        passthrough += ["--max-num-seqs", str(rollout.vllm_max_num_seqs or batch)]
    cmd = ["taskset", "-c", str(core), sys.executable, "-m", "reasonrl.cli", "serve", resolve_model_path(MODEL),
           "--port", str(port), "--dtype", dtype, "--weight-token-file", str(token_file)]
    cmd += ["--", *passthrough] if passthrough else []
    env = {k: v for k, v in os.environ.items() if k not in (WEIGHT_TOKEN_ENV, WEIGHT_TOKEN_FILE_ENV, API_KEY_ENV)}
    env = pinned_env(env, core, vllm=True)
    log = folder / "server.log"
    begin = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                                cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + SERVER_START_TIMEOUT_S
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RowFailed(f"reasonrl serve exited with {proc.returncode}:\n{tail(log)}")
            try:
                ServerClient(url, 5).get("/health")
                return proc, url, time.perf_counter() - begin
            except ServerUnavailableError:
                time.sleep(2)
        raise RowFailed(f"reasonrl serve did not become healthy in {SERVER_START_TIMEOUT_S} s:\n{tail(log)}")
    except BaseException:
        kill_group(proc)
        raise


# ----------------------------------------------------------------------------------------------------------- rows
def row_overrides(args, engine: str, staleness: int, out_dir: Path, url: str | None) -> list[str]:
    overrides = [f"trainer.steps={args.steps}", "trainer.save_every=0", f"trainer.output_dir={out_dir}",
                 f"logging.wandb_mode={wandb_override()}", f"rollout.engine={engine}",
                 f"rollout.max_staleness={staleness}"]
    if args.num_eval is not None:
        overrides.append(f"data.num_eval={args.num_eval}")
    if url:
        overrides.append(f"rollout.server_url={url}")
    return overrides


def run_row(args, name: str, root: Path, cores: tuple[int, int]) -> dict:
    from reasonrl.config import load_config
    from reasonrl.precision import resolve_precision
    from reasonrl.rollout.server_auth import API_KEY_ENV, WEIGHT_TOKEN_ENV, WEIGHT_TOKEN_FILE_ENV

    engine, staleness, pinned = ROWS[name]
    folder = root / name
    out_dir = folder / "run"
    folder.mkdir(parents=True)
    config = load_config(str(RECIPE), row_overrides(args, engine, staleness, out_dir, None))
    server, url, server_startup = None, None, None
    env = {k: v for k, v in os.environ.items() if k not in (WEIGHT_TOKEN_ENV, WEIGHT_TOKEN_FILE_ENV, API_KEY_ENV)}
    train_core, server_core = cores
    trainer = None
    try:
        if engine == "server":
            token = secrets.token_hex(24)
            print(f"[{name}] starting reasonrl serve on core {server_core} ...", file=sys.stderr, flush=True)
            dtype = resolve_precision(config.model.dtype, "cpu").dtype
            server, url, server_startup = start_server(folder, server_core, token, config.rollout, dtype)
            env[WEIGHT_TOKEN_ENV] = token
        cmd = [sys.executable, "-m", "reasonrl.cli", "train", str(RECIPE),
               *row_overrides(args, engine, staleness, out_dir, url)]
        if pinned:
            cmd = ["taskset", "-c", str(train_core), *cmd]
            env = pinned_env(env, train_core, vllm=False)
        print(f"[{name}] {' '.join(cmd[cmd.index('train'):])}", file=sys.stderr, flush=True)
        begin = time.perf_counter()
        with open(folder / "train.stdout", "w") as out, open(folder / "train.stderr", "w") as err:
            trainer = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True, env=env, cwd=REPO)
            try:
                code = trainer.wait(timeout=args.row_timeout)
            except subprocess.TimeoutExpired:
                raise RowFailed(f"`reasonrl train` ran past --row-timeout {args.row_timeout} s:\n"
                                f"{tail(folder / 'train.stderr')}") from None
        wall = time.perf_counter() - begin
        if code != 0:
            server_log = f"\n--- server log tail ---\n{tail(folder / 'server.log', 1500)}" if server else ""
            raise RowFailed(f"`reasonrl train` exited with {code}:\n{tail(folder / 'train.stderr')}{server_log}")
        if server is not None and server.poll() is not None:
            raise RowFailed(f"reasonrl serve died during the run ({server.returncode}):\n{tail(folder / 'server.log')}")
    finally:
        kill_group(trainer)
        kill_group(server)
    row = summarize(out_dir, config, args.steps)
    row.update(engine=engine, max_staleness=staleness, pinned=pinned, wall_s=wall, server_startup_s=server_startup,
               cores=f"trainer {train_core}, server {server_core}" if pinned else
               "shared" if server is None else f"trainer {train_core}+{server_core}, server {server_core}")
    return row


def summarize(out_dir: Path, config, steps: int) -> dict:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in (json.loads(x) for x in lines if x.strip()) if "time/step" in r]
    if len(records) != steps:
        raise RowFailed(f"{out_dir}/metrics.jsonl has {len(records)} step rows, expected {steps}")

    def total(key):
        values = [r[key] for r in records if key in r]
        return sum(values) if values else None

    def mean(key):
        values = [r[key] for r in records if key in r]
        return sum(values) / len(values) if values else None

    def peak(key):
        values = [r[key] for r in records if key in r]
        return max(values) if values else None

    samples = steps * config.rollout.prompts_per_step * config.rollout.group_size
    step_s = total("time/step")
    evals = json.loads((out_dir / "eval_results.json").read_text()).get("eval_history", [])
    first, final = (evals[0], evals[-1]) if evals else ({}, {})
    dropped = total("async/dropped")
    return {
        "steps": steps, "samples": samples, "step_s": step_s, "samples_per_s": samples / step_s,
        "trained_samples_per_s": (samples - (dropped or 0)) / step_s,
        "generate_s": total("time/generate"), "train_s": total("time/train"),
        "learner_wait_s": total("async/learner_wait_s"), "producer_wait_s": total("async/producer_wait_s"),
        "staleness_mean": mean("async/staleness_mean"), "staleness_max": peak("async/staleness_max"),
        "dropped": dropped,
        "eval_accuracy_start": first.get("accuracy"), "eval_step_start": first.get("step"),
        "eval_accuracy": final.get("accuracy"), "eval_step": final.get("step"), "eval_n": final.get("n"),
        "output_dir": str(out_dir),
    }


# ---------------------------------------------------------------------------------------------------------- report
def fmt(value, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def print_table(rows: dict, failed: dict, args, kind: str, config) -> None:
    num_eval = args.num_eval if args.num_eval is not None else config.data.num_eval
    print(f"\n{args.steps} steps x {config.rollout.prompts_per_step} prompts x {config.rollout.group_size} samples, "
          f"up to {config.rollout.max_new_tokens} new tokens, model {config.model.name_or_path} "
          f"({config.model.dtype}), greedy eval on {num_eval} held-out problems; machine: {kind}\n")
    print("| row | engine | max_staleness | cores | samples/s | vs sync | wall s | server start s | generate s | "
          "train s | learner wait s | producer wait s | staleness mean / max | dropped | eval acc start -> end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    sync = rows.get("sync")
    for name, row in rows.items():
        ratio = f"{row['samples_per_s'] / sync['samples_per_s']:.2f}x" if sync else "-"
        acc = (f"{fmt(row['eval_accuracy_start'], '.1%')} -> {fmt(row['eval_accuracy'], '.1%')}"
               if row["eval_accuracy"] is not None else "-")
        print(f"| {name} | {row['engine']} | {row['max_staleness']} | {row['cores']} | {row['samples_per_s']:.2f} | "
              f"{ratio} | {row['wall_s']:.0f} | {fmt(row['server_startup_s'], '.0f')} | {fmt(row['generate_s'])} | "
              f"{fmt(row['train_s'])} | {fmt(row['learner_wait_s'])} | {fmt(row['producer_wait_s'])} | "
              f"{fmt(row['staleness_mean'], '.2f')} / {fmt(row['staleness_max'], '.0f')} | "
              f"{fmt(row['dropped'], '.0f')} | {acc} |")
    for name in failed:
        print(f"| {name} | {ROWS[name][0]} | {ROWS[name][1]} | - | failed | - | - | - | - | - | - | - | - | - | - |")
    print()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--num-eval", type=int, default=None, help="data.num_eval (default: the recipe's)")
    parser.add_argument("--row-timeout", type=float, default=4 * 3600, help="seconds one `reasonrl train` may take")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object with the figures")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed at the end)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        parser.error(f"--rows: unknown {unknown} (choose from {', '.join(ROWS)})")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    names = [n for n in ROWS if n in names]  # the table's order
    usable = sorted(os.sched_getaffinity(0))
    if any(ROWS[n][2] for n in names) and len(usable) < 2:
        parser.error(f"the server rows pin trainer and server to two cores; this process may use only {usable}")
    cores = (usable[0], usable[1]) if len(usable) >= 2 else (usable[0], usable[0])

    from reasonrl.config import load_config

    config = load_config(str(RECIPE), [f"trainer.steps={args.steps}"] +
                         ([f"data.num_eval={args.num_eval}"] if args.num_eval is not None else []))
    kind = machine_kind()

    def on_term(signum, frame):  # run the finally blocks: trainer and server process groups are killed
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    root = Path(tempfile.mkdtemp(prefix="bench_async_"))
    rows, failed = {}, {}
    try:
        for name in names:
            try:
                rows[name] = run_row(args, name, root, cores)
                r = rows[name]
                print(f"[{name}] {r['samples_per_s']:.2f} samples/s, wall {r['wall_s']:.0f} s, eval "
                      f"{fmt(r['eval_accuracy'], '.1%')}", file=sys.stderr, flush=True)
            except RowFailed as err:
                failed[name] = str(err)
                print(f"[{name}] FAILED:\n{err}", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"run folders kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    print_table(rows, failed, args, kind, config)
    if args.json:
        def figure(name, key):
            return rows[name][key] if name in rows else None

        summary = {f"{n}_samples_per_s": figure(n, "samples_per_s") for n in ROWS}
        summary.update({f"{n}_eval_accuracy": figure(n, "eval_accuracy") for n in ROWS})
        for n in ("sync_server", "async_k1", "async_k2", "async_k1_shared"):
            both = n in rows and "sync" in rows
            summary[f"{n}_vs_sync"] = rows[n]["samples_per_s"] / rows["sync"]["samples_per_s"] if both else None
        summary.update(machine=kind, config={"steps": args.steps, "rows": names, "num_eval": args.num_eval,
                                             "prompts_per_step": config.rollout.prompts_per_step,
                                             "group_size": config.rollout.group_size, "recipe": str(RECIPE)},
                       rows=rows, failed={n: e[-TAIL_CHARS:] for n, e in failed.items()})
        print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
