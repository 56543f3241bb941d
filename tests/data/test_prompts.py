import json
from itertools import islice

import pytest

from reasonrl.data.prompts import DataError, arithmetic_rows, build_prompt, load_jsonl_rows


def test_arithmetic_deterministic_and_correct():
    a = arithmetic_rows(20, seed=3, digits=3, operands=3)
    assert a == arithmetic_rows(20, seed=3, digits=3, operands=3)
    assert a != arithmetic_rows(20, seed=4, digits=3, operands=3)
    for row in a:
        toks = row["question"].split()
        assert len(toks) == 5
        assert all(100 <= int(t) <= 999 for t in toks[::2])
        assert all(op in "+-*" for op in toks[1::2])
        assert int(row["answer"]) == eval(row["question"])
    assert all("*" in r["question"] for r in arithmetic_rows(5, seed=0, operators="*"))


def test_arithmetic_mixed_operand_counts():
    mixed = arithmetic_rows(400, seed=1, operands=3, min_operands=2)
    assert mixed == arithmetic_rows(400, seed=1, operands=3, min_operands=2)
    counts = [len(row["question"].split()) // 2 + 1 for row in mixed]
    assert set(counts) == {2, 3} and 150 < counts.count(3) < 250  # uniform over [2, 3]
    assert all(int(row["answer"]) == eval(row["question"]) for row in mixed)
    # 0 draws no count: the rows of a fixed count do not change with the option
    assert arithmetic_rows(30, seed=1, operands=3, min_operands=0) == arithmetic_rows(30, seed=1, operands=3)
    assert {len(r["question"].split()) for r in arithmetic_rows(30, seed=1, operands=3, min_operands=3)} == {5}
    for bad in (1, 4):
        with pytest.raises(ValueError, match="min_operands"):
            arithmetic_rows(3, seed=0, operands=3, min_operands=bad)


def test_gsm8k_sample(tmp_path, shared_data):
    with open(shared_data / "gsm8k" / "test.jsonl") as f:  # a missing file is a failure, not a skip
        lines = list(islice(f, 3))
    p = tmp_path / "g.jsonl"
    p.write_text("".join(lines))
    rows = load_jsonl_rows(p)
    assert len(rows) == 3 and rows[0]["answer"] == "18"
    raw = load_jsonl_rows(p, answer_mode="raw")
    assert "####" in raw[0]["answer"] and raw[0]["question"] == rows[0]["question"]


def test_hash_strips_commas_and_custom_keys(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"q": "Q?", "a": "work\n#### 1,234"}) + "\n\n")
    assert load_jsonl_rows(p, question_key="q", answer_key="a") == [{"question": "Q?", "answer": "1234"}]


@pytest.mark.parametrize(
    "bad",
    ["{not json", json.dumps({"question": "q"}), json.dumps({"question": 5, "answer": "#### 1"})],
)
def test_malformed_rows_name_file_and_line(tmp_path, bad):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"question": "ok", "answer": "#### 1"}) + "\n" + bad + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        load_jsonl_rows(p)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_jsonl_rows(tmp_path / "nope.jsonl")


def test_build_prompt():
    msgs = build_prompt("1 + 1", "Solve: {question}\nEnd with '#### <answer>'.")
    assert msgs == [{"role": "user", "content": "Solve: 1 + 1\nEnd with '#### <answer>'."}]


def test_parquet_rows_and_malformed_row(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    from datasets import Dataset

    good = tmp_path / "good.parquet"
    Dataset.from_dict({"q": ["1 + 1", "2 * 3"], "a": ["x #### 2", "y #### 6"]}).to_parquet(str(good))
    rows = load_jsonl_rows(good, question_key="q", answer_key="a")
    assert rows == [{"question": "1 + 1", "answer": "2"}, {"question": "2 * 3", "answer": "6"}]

    bad = tmp_path / "bad.parquet"
    Dataset.from_dict({"question": ["1 + 1", None], "answer": ["#### 2", "#### 3"]}).to_parquet(str(bad))
    with pytest.raises(DataError, match=r"bad.parquet:row 1"):
        load_jsonl_rows(bad)


def test_extra_columns_are_kept_and_required(tmp_path):
    from reasonrl.data.prompts import DataError, load_jsonl_rows

    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q1", "answer": "1", "ref_length": 12, "big": [1, 2]}\n'
                    '{"question": "q2", "answer": "2", "ref_length": null, "big": []}\n')
    rows = load_jsonl_rows(path, answer_mode="raw", extra_columns=("ref_length",))
    assert rows == [{"ref_length": 12, "question": "q1", "answer": "1"},
                    {"ref_length": None, "question": "q2", "answer": "2"}]
    assert load_jsonl_rows(path, answer_mode="raw")[0] == {"question": "q1", "answer": "1"}
    with pytest.raises(DataError, match="missing key 'score'"):
        load_jsonl_rows(path, answer_mode="raw", extra_columns=("score",))
