import json

import pytest

from reasonrl.config import DataConfig
from reasonrl.data.prompts import DataError
from reasonrl.data.tasks import load_task_rows


def test_arithmetic_eval_problems_are_held_out():
    train, eval_rows = load_task_rows(DataConfig(num_train=300, num_eval=50, digits=1))
    assert len(train) == 300 and len(eval_rows) == 50
    assert not {r["question"] for r in eval_rows} & {r["question"] for r in train}


def test_jsonl_holds_out_the_last_rows_or_uses_eval_path(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"q": f"x{i}", "a": f"so #### {i}"}) + "\n" for i in range(10)))
    cfg = DataConfig(source="jsonl", path=str(path), question_key="q", answer_key="a", num_train=0, num_eval=3)
    train, eval_rows = load_task_rows(cfg)
    assert [r["answer"] for r in eval_rows] == ["7", "8", "9"] and len(train) == 7
    cfg.eval_path = str(path)
    train, eval_rows = load_task_rows(cfg)
    assert len(train) == 10 and [r["answer"] for r in eval_rows] == ["0", "1", "2"]
    cfg.eval_path, cfg.num_eval = None, 0  # no held-out rows: every row trains (rows[:-0] would be none)
    train, eval_rows = load_task_rows(cfg)
    assert len(train) == 10 and eval_rows == []


def test_file_sources_need_a_path():
    with pytest.raises(DataError, match="needs data.path"):
        load_task_rows(DataConfig(source="jsonl"))
