"""DRQA data building: batch prompts, per-question parsing, preferences, reference length, the reward, the command."""

import json

import pytest

from reasonrl.data.drqa import (
    batch_chain,
    batch_prompt,
    preference_pairs,
    preferred_reference_length,
    split_batch_answer,
    summarize,
    text_length,
)
from reasonrl.rewards.combine import resolve_reward, score_batch
from reasonrl.rewards.drqa import concise_correct
from reasonrl.rollout.base import RolloutOutput

# ---- batch prompt --------------------------------------------------------------------------------------------------


def test_batch_prompt_numbers_the_questions_and_asks_for_answer_lines():
    prompt = batch_prompt(["12 + 30", "  Tom has 3 apples and eats one. How many are left?\n"])
    assert "Answer the following 2 questions in order" in prompt
    assert '"Answer k: <number>"' in prompt
    assert prompt.endswith("Question 1: 12 + 30\nQuestion 2: Tom has 3 apples and eats one. How many are left?")
    assert batch_prompt(["1 + 1"]).startswith("Answer the following question.")


@pytest.mark.parametrize("bad", [[], "1 + 1", ["1 + 1", "  "], ["1 + 1", None]])
def test_batch_prompt_rejects_bad_question_lists(bad):
    with pytest.raises(ValueError, match="question"):
        batch_prompt(bad)


# ---- parsing batch answers -----------------------------------------------------------------------------------------


def test_split_batch_answer_attributes_segments_and_answers():
    text = (
        "Question 1: 12 + 30 is 42.\n"
        "Answer 1: 42\n"
        "Tom had 3 and ate 1, so 3 - 1 = 2.\n"
        "**Answer 2:** 2 apples\n"
        "Half of 1,000 is 500, plus 700.\n"
        "Final answer 3: 500 + 700 = $1,200.\n"
    )
    parts = split_batch_answer(text, 3)
    assert parts == [
        {"index": 1, "text": "Question 1: 12 + 30 is 42.", "answer": "42"},
        {"index": 2, "text": "Tom had 3 and ate 1, so 3 - 1 = 2.", "answer": "2"},
        {"index": 3, "text": "Half of 1,000 is 500, plus 700.", "answer": "1200"},  # the number after the last '='
    ]


def test_split_batch_answer_missing_malformed_out_of_order_and_extra_lines():
    text = (
        "second one first: 7 * 6\n"
        "Answer 2: 42\n"
        "now the first: no idea\n"
        "Answer 1: I don't know\n"  # malformed: no number -> None, the segment is kept
        "Answer 2: 41\n"  # a repeat: only a boundary, question 2 keeps its first answer
        "Answer 9: 5\n"  # out of range: only a boundary
        "trailing talk without an answer line"
    )
    parts = split_batch_answer(text, 4)
    assert parts[0] == {"index": 1, "text": "now the first: no idea", "answer": None}
    assert parts[1] == {"index": 2, "text": "second one first: 7 * 6", "answer": "42"}
    assert parts[2:] == [{"index": 3, "text": "", "answer": None},  # missing: no exception
                         {"index": 4, "text": "", "answer": None}]


@pytest.mark.parametrize("text", ["", "no answer lines at all", None, "Answer : 3\nanswer1: 4"])
def test_split_batch_answer_without_answer_lines_gives_none(text):
    assert split_batch_answer(text, 2) == [{"index": 1, "text": "", "answer": None},
                                           {"index": 2, "text": "", "answer": None}]


def test_split_batch_answer_falls_back_to_numbered_items():
    # SmolLM2-135M's actual batch style: a numbered list, no "Answer k:" lines
    text = "1. 12 + 35 = 47 - 19 = 24\n2) 47 - 19 = 28\nQuestion 3: 8 * 6 is 48\n3.5 is not a marker\n\n1. repeat"
    assert split_batch_answer(text, 3) == [
        {"index": 1, "text": "12 + 35 = 47 - 19 = 24", "answer": "24"},  # the number after the last '='
        {"index": 2, "text": "47 - 19 = 28", "answer": "28"},
        {"index": 3, "text": "8 * 6 is 48\n3.5 is not a marker", "answer": "3.5"},  # no '=': the last number
    ]
    assert split_batch_answer("1. 5 + 5 = \\boxed{10} = ten\n", 2) == [
        {"index": 1, "text": "5 + 5 = \\boxed{10} = ten", "answer": "10"},
        {"index": 2, "text": "", "answer": None},
    ]


def test_split_batch_answer_prefers_answer_lines_over_numbered_items():
    text = "1. first 2 + 2\nAnswer 1: 4\n2. then 3 + 3\nAnswer 2: 6"
    assert [p["answer"] for p in split_batch_answer(text, 2)] == ["4", "6"]
    assert split_batch_answer(text, 2)[1]["text"] == "2. then 3 + 3"


def test_split_batch_answer_boxed_and_negative_values():
    parts = split_batch_answer("a\nAnswer 1: \\boxed{-10}\nb\nanswer 2 : -0.5 (rounded)", 2)
    assert [p["answer"] for p in parts] == ["-10", "-0.5"]
    with pytest.raises(ValueError, match="positive int"):
        split_batch_answer("Answer 1: 3", 0)


def test_batch_chain_is_the_single_question_form():
    assert batch_chain("  3 - 1 = 2 \n", "2") == "3 - 1 = 2\n#### 2"
    assert batch_chain("", "2") == "#### 2"
    assert batch_chain("no idea", None) == "no idea"
    assert text_length("  #### 2\n") == 6  # characters, surrounding whitespace stripped


# ---- preferences and the reference length -------------------------------------------------------------------------


def _cand(text, length, correct, source):
    return {"text": text, "length": length, "correct": correct, "source": source}


CANDIDATES = [
    _cand("A short right", 10, True, "batch"),
    _cand("B long right", 20, True, "single"),
    _cand("C long right", 20, True, "batch"),  # same length as B: no pair between them
    _cand("D short wrong", 5, False, "single"),
    _cand("", 0, False, "batch"),  # empty (a batch question with no answer line): in no pair
]


def test_preference_pairs_order_correct_shorter_then_correct_longer_then_incorrect():
    pairs = preference_pairs("q", "7", CANDIDATES)
    got = {(p["chosen"][0], p["rejected"][0], p["reason"]) for p in pairs}
    assert got == {
        ("A", "B", "length"), ("A", "C", "length"),  # correct & shorter > correct & longer
        ("A", "D", "correctness"), ("B", "D", "correctness"), ("C", "D", "correctness"),  # correct > incorrect
    }
    ad = next(p for p in pairs if p["chosen"][0] == "A" and p["rejected"][0] == "D")
    assert ad == {"question": "q", "answer": "7", "chosen": "A short right", "rejected": "D short wrong",
                  "chosen_length": 10, "rejected_length": 5, "chosen_source": "batch", "rejected_source": "single",
                  "reason": "correctness"}
    assert preference_pairs("q", "7", CANDIDATES[3:]) == []  # incorrect vs incorrect: no pair


def test_preferred_reference_length_is_the_shortest_correct_positive_length():
    assert preferred_reference_length(CANDIDATES) == 10
    assert preferred_reference_length(CANDIDATES[1:]) == 20
    assert preferred_reference_length(CANDIDATES[3:]) is None  # nothing correct
    assert preferred_reference_length([_cand("", 0, True, "batch"), _cand("x", 3, True, "single")]) == 3
    assert preferred_reference_length([]) is None


@pytest.mark.parametrize(("bad", "error", "match"), [
    (_cand("x", 3, True, "teacher"), ValueError, "source"),
    (_cand("x", -1, True, "single"), ValueError, "length"),
    (_cand("x", 2.5, True, "single"), ValueError, "length"),
    (_cand("x", 3, 1, "single"), TypeError, "correct must be a bool"),
    (_cand(None, 3, True, "single"), TypeError, "text"),
    ({"text": "x", "length": 3}, ValueError, "lacks"),
    ("x", TypeError, "must be a dict"),
])
def test_candidates_are_validated(bad, error, match):
    with pytest.raises(error, match=f"candidate 1.*{match}"):
        preference_pairs("q", "1", [CANDIDATES[0], bad])
    with pytest.raises(error, match=match):
        preferred_reference_length([CANDIDATES[0], bad])


def test_preference_pairs_validates_question_and_list():
    with pytest.raises(ValueError, match="question"):
        preference_pairs(" ", "1", CANDIDATES)
    with pytest.raises(ValueError, match="answer"):
        preference_pairs("q", None, CANDIDATES)
    with pytest.raises(TypeError, match="list"):
        preference_pairs("q", "1", CANDIDATES[0])


# ---- the reward ----------------------------------------------------------------------------------------------------


def test_concise_correct_by_hand():
    completions = [
        "6 * 7 = 42\n#### 42",  # correct, 18 chars, ref 20: 1 + 0.5 * (1 - 18/20) = 1.05
        "#### 42",  # correct, 7 chars, ref 20: 1 + 0.5 * (1 - 7/20) = 1.325
        "x" * 30 + " #### 42",  # correct, 38 chars > ref 20: no bonus, 1.0
        "#### 41",  # wrong: 0
        "#### 42",  # correct, no reference (null): 1.0
        "#### 42",  # correct, reference 0 (unusable): 1.0
    ]
    refs = [20, 20, 20, 20, None, 0]
    got = concise_correct(completions, ["42"] * 6, refs)
    assert got == pytest.approx([1.05, 1.325, 1.0, 0.0, 1.0, 1.0])
    # lam = 1: 1 + 1 * (1 - 7/20) = 1.65; without the column every correct answer gets 1.0
    assert concise_correct(["#### 42"], ["42"], [20], lam=1.0) == pytest.approx([1.65])
    assert concise_correct(["#### 42", "#### 1"], ["42", "42"]) == [1.0, 0.0]


def test_concise_correct_validates_and_is_registered():
    with pytest.raises(ValueError, match="lam"):
        concise_correct(["#### 1"], ["1"], [5], lam=-0.1)
    with pytest.raises(ValueError, match="ref_length has 2 values"):
        concise_correct(["#### 1"], ["1"], [5, 6])
    func = resolve_reward("drqa_concise")
    assert func is concise_correct
    # as the trainer calls it: every row column is a keyword argument (extra ones ignored)
    columns = {"question": ["q", "q"], "answer": ["42", "42"], "ref_length": [20, 20], "pairs": [[], []]}
    total, valid, _, errors, _ = score_batch([("drqa_concise", func, 1.0)], ["#### 42", "#### 0"], columns)
    assert total == pytest.approx([1.325, 0.0]) and valid == [True, True] and errors == 0


# ---- building rows -------------------------------------------------------------------------------------------------


class ScriptedEngine:
    """Answers each prompt (decoded) with the text of the first script entry whose key occurs in it."""

    def __init__(self, tokenizer, script: list[tuple[str, list[str]]]):
        self.tokenizer, self.script, self.calls = tokenizer, script, []

    def generate(self, prompt_ids, params, max_new_tokens, logits_processors=None):
        self.calls.append((len(prompt_ids), params, list(max_new_tokens)))
        out = RolloutOutput([], [], [])
        for ids in prompt_ids:
            prompt = self.tokenizer.decode(ids)
            texts = next(texts for key, texts in self.script if key in prompt)
            assert len(texts) == params.n
            for text in texts:
                out.completion_ids.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                out.logprobs.append([0.0] * len(out.completion_ids[-1]))
                out.finish_reasons.append("stop")
        return out


def test_build_rows_scores_both_modes_and_derives_reference_and_pairs():
    from reasonrl.drqa_cli import build_rows
    from reasonrl.tiny_model import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    rows = [{"question": "2 + 3", "answer": "5"}, {"question": "4 * 4", "answer": "16"},
            {"question": "9 - 1", "answer": "8"}]
    script = [
        ("Question 1: 9 - 1", ["9 - 1 is 8\nAnswer 1: 8", "Answer 1: 7"]),  # the last batch: question 3 alone
        ("Question 1", ["2 + 3 = 5\nAnswer 1: 5\nAnswer 2: 16", "so\nAnswer 1: 6\n4 * 4 = 16\nAnswer 2: 16"]),
        ("What is 2 + 3", ["Adding 2 and 3 gives 5.\n#### 5", "#### 6"]),
        ("What is 4 * 4", ["Four fours make sixteen, so 16.\n#### 16", "sixteen"]),
        ("What is 9 - 1", ["#### 7", "#### 9"]),
    ]
    engine = ScriptedEngine(tokenizer, script)
    out = build_rows(engine, tokenizer, rows, template="What is {question}? Put the final answer after '####'.",
                     samples=2, max_new_tokens=32, batch_max_new_tokens=64, questions_per_batch=2, temperature=1.0,
                     seed=0)
    assert [call[0] for call in engine.calls] == [3, 2]  # 3 single prompts, then 2 batch prompts (2 + 1 questions)
    assert engine.calls[1][2] == [64, 64]
    first, second, third = out
    assert [c["correct"] for c in first["single"]] == [True, False]
    assert [(c["text"], c["correct"]) for c in first["batch"]] == [("2 + 3 = 5\n#### 5", True), ("so\n#### 6", False)]
    assert first["ref_length"] == text_length("2 + 3 = 5\n#### 5") == 16  # the batch chain beats the single one (30)
    assert {(p["chosen_source"], p["rejected_source"], p["reason"]) for p in first["pairs"]} == {
        ("batch", "single", "length"), ("single", "single", "correctness"), ("batch", "single", "correctness"),
        ("single", "batch", "correctness"), ("batch", "batch", "correctness"),
    }
    assert second["batch"][0] == {"text": "#### 16", "length": 7, "tokens": 7, "correct": True, "prediction": "16",
                                  "truncated": False}  # nothing between "Answer 1: 5" and "Answer 2: 16"
    assert second["batch"][1]["text"] == "4 * 4 = 16\n#### 16" and second["ref_length"] == 7
    assert third["single"][0]["prediction"] == "7" and not any(c["correct"] for c in third["single"])
    assert [c["correct"] for c in third["batch"]] == [True, False] and third["ref_length"] == len("9 - 1 is 8\n#### 8")
    summary = summarize(out)
    assert summary["rows"] == 3 and summary["rows_with_correct"] == 3 and summary["rows_with_ref_length"] == 3
    assert summary["single_accuracy"] == pytest.approx(2 / 6) and summary["batch_accuracy"] == pytest.approx(4 / 6)
    assert summary["batch_answered"] == 1.0 and summary["pairs"] == sum(len(r["pairs"]) for r in out)


# ---- the command ---------------------------------------------------------------------------------------------------


def test_drqa_data_command_writes_rows_the_jsonl_loader_reads(tiny_model_dir, tmp_path, capsys):
    from reasonrl.cli import main
    from reasonrl.config import DataConfig
    from reasonrl.data.tasks import load_task_rows

    out = tmp_path / "drqa" / "arith.jsonl"
    argv = ["drqa-data", "--model", tiny_model_dir, "--task", "arithmetic", "--n-questions", "4",
            "--batch-size-questions", "3", "--samples", "2", "--max-new-tokens", "8", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"drqa-data: 4 questions -> {out}" in printed and "preference pairs:" in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert set(row) == {"question", "answer", "single", "batch", "ref_length", "pairs"}
        assert len(row["single"]) == 2 and len(row["batch"]) == 2
        for chain in row["single"] + row["batch"]:
            assert set(chain) == {"text", "length", "tokens", "correct", "prediction", "truncated"}
            assert chain["length"] == text_length(chain["text"]) and isinstance(chain["correct"], bool)
        correct = [c["length"] for c in row["single"] + row["batch"] if c["correct"] and c["length"] > 0]
        assert row["ref_length"] == (min(correct) if correct else None)
    # the file trains as data.source=jsonl with answer_mode=raw
    cfg = DataConfig(source="jsonl", path=str(out), eval_path=str(out), answer_mode="raw", num_train=0)
    train, _ = load_task_rows(cfg)
    assert [(r["question"], r["answer"]) for r in train] == [(r["question"], r["answer"]) for r in rows]
