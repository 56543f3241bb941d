"""Train/eval prompt rows for a recipe's `data` section."""

from __future__ import annotations

from reasonrl.data.prompts import DataError, arithmetic_rows, check_row, load_jsonl_rows

__all__ = ["load_task_rows", "task_rows"]

# Eval problems are drawn from a different seed stream than training ones, then de-duplicated against them.
_EVAL_SEED_OFFSET = 1_000_003


def _arithmetic_split(cfg) -> tuple[list[dict], list[dict]]:
    kwargs = {"digits": cfg.digits, "operators": cfg.operators, "operands": cfg.operands,
              "min_operands": cfg.min_operands}
    train = arithmetic_rows(cfg.num_train, seed=cfg.seed, **kwargs)
    seen = {row["question"] for row in train}
    eval_rows, draw = [], 0
    while len(eval_rows) < cfg.num_eval:
        batch = arithmetic_rows(cfg.num_eval, seed=cfg.seed + _EVAL_SEED_OFFSET + draw, **kwargs)
        eval_rows += [row for row in batch if row["question"] not in seen][: cfg.num_eval - len(eval_rows)]
        draw += 1
        if draw > 50:
            raise DataError("cannot draw enough held-out arithmetic problems; lower data.num_eval or raise digits")
    return train, eval_rows


def _file_rows(cfg, path: str) -> list[dict]:
    return load_jsonl_rows(path, question_key=cfg.question_key, answer_key=cfg.answer_key, answer_mode=cfg.answer_mode,
                           extra_columns=tuple(cfg.extra_columns))


def _file_split(cfg) -> tuple[list[dict], list[dict]]:
    if not cfg.path:
        raise DataError(f"data.source={cfg.source} needs data.path")
    rows = _file_rows(cfg, cfg.path)
    if cfg.eval_path:
        train, eval_rows = rows, _file_rows(cfg, cfg.eval_path)
    else:  # hold out the last num_eval rows of the file
        if len(rows) <= cfg.num_eval:
            raise DataError(f"{cfg.path} has {len(rows)} rows: too few to hold out data.num_eval={cfg.num_eval}")
        split = len(rows) - cfg.num_eval  # (not rows[:-n]: n = 0 would leave no training rows)
        train, eval_rows = rows[:split], rows[split:]
    return train[: cfg.num_train] if cfg.num_train > 0 else train, eval_rows[: cfg.num_eval]


def _hub_split(cfg) -> tuple[list[dict], list[dict]]:
    import datasets

    if not cfg.path:
        raise DataError("data.source=hub needs data.path (a dataset name as in datasets.load_dataset)")

    def load(split: str) -> list[dict]:
        ds = datasets.load_dataset(cfg.path, cfg.hub_config, split=split)
        missing = {cfg.question_key, cfg.answer_key} - set(ds.column_names)
        if missing:
            raise DataError(f"{cfg.path}[{split}] has no column(s) {sorted(missing)}; columns: {ds.column_names}")
        where = f"{cfg.path}[{split}]:row"
        return [
            check_row(row, f"{where} {i}", cfg.question_key, cfg.answer_key, cfg.answer_mode, tuple(cfg.extra_columns))
            for i, row in enumerate(ds)
        ]

    train, eval_rows = load(cfg.train_split), load(cfg.eval_split)
    return train[: cfg.num_train] if cfg.num_train > 0 else train, eval_rows[: cfg.num_eval]


def load_task_rows(cfg) -> tuple[list[dict], list[dict]]:
    """(train_rows, eval_rows), each row {"question", "answer"}; sources: arithmetic, jsonl/parquet files, hub."""
    if cfg.source == "arithmetic":
        return _arithmetic_split(cfg)
    if cfg.source in ("jsonl", "parquet"):
        return _file_split(cfg)
    return _hub_split(cfg)


def task_rows(config, env) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of a recipe: its data section, or a verifiers environment's own data sets (`env`, the
    loaded environment of its env section; None without one)."""
    if config.env.source != "verifiers":
        return load_task_rows(config.data)
    d = config.data
    train, eval_rows = env.rows("train"), env.rows("eval")
    return (train[: d.num_train] if d.num_train > 0 else train), eval_rows[: d.num_eval]
