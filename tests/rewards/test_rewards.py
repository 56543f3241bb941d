import logging
import math

import pytest

from reasonrl.rewards.combine import REWARD_REGISTRY, resolve_reward, score_batch
from reasonrl.rewards.math import accuracy_reward, answers_match, extract_answer, format_reward


@pytest.mark.parametrize(
    "text,mode,expected",
    [
        ("so 12 + 3 = 15. #### 15", "hash", "15"),
        ("#### 1,234.", "hash", "1234"),
        ("#### $12.0", "hash", "12"),
        ("no hash here 5", "hash", None),
        ("x \\boxed{\\frac{1}{2}} done", "boxed", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{42}", "boxed", "42"),
        ("\\boxed{unclosed", "boxed", None),
        ("the total is 1,234", "last_number", "1234"),
        ("from 3 to -7.50.", "last_number", "-7.50"),
        ("nothing", "last_number", None),
        ("7 and \\boxed{9} #### 11", "lenient", "11"),
        ("7 and \\boxed{9}", "lenient", "9"),
        ("7 and then 8.0.", "lenient", "8"),
    ],
)
def test_extract_modes(text, mode, expected):
    assert extract_answer(text, mode=mode) == expected


def test_extract_bad_mode():
    with pytest.raises(ValueError, match="lenient"):
        extract_answer("1", mode="nope")


def test_answers_match():
    assert answers_match("12", "12.0")
    assert answers_match("1,000", "1000")
    assert answers_match("0.3333333", "0.33333331")
    assert not answers_match("13", "12")
    assert not answers_match(None, "12")
    assert answers_match("\\frac{1}{2}", "0.5")
    assert answers_match("\\frac{2}{4}", "\\frac{1}{2}")
    assert answers_match("abc", " abc ")


def test_accuracy_and_format():
    comps = ["so #### 15", "\\boxed{14}", "no answer", "#### 1,234 ."]
    assert accuracy_reward(comps, ["15", "15", "3", "1234"]) == [1.0, 0.0, 0.0, 1.0]
    assert format_reward(comps) == [1.0, 0.0, 0.0, 1.0]
    assert format_reward(["#### 15 then more text", "#### -3.5\n"]) == [0.0, 1.0]


def _boom(completions, **kw):
    raise ZeroDivisionError("boom")


def _nan(completions, **kw):
    return [1.0, float("nan"), None][: len(completions)]


def _short(completions, **kw):
    return [1.0]


def _ones(completions, **kw):
    return [1.0] * len(completions)


def test_score_batch_weights():
    comps = ["#### 15", "#### 3"]
    total, valid, per, errors, _ = score_batch(
        [("accuracy", accuracy_reward, 2.0), ("format", format_reward, 0.5)], comps, {"answer": ["15", "4"]}
    )
    assert total == [2.5, 0.5] and valid == [True, True] and errors == 0
    assert per == {"accuracy": [1.0, 0.0], "format": [1.0, 1.0]}


def test_score_batch_raising_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="reasonrl.rewards")
    logged = set()
    for _ in range(2):
        total, valid, _per, errors, failures = score_batch(
            [("boom", _boom, 1.0), ("ones", _ones, 1.0)], ["a", "b"], {}, logged=logged
        )
        assert valid == [False, False] and total == [0.0, 0.0] and errors == 1
        # every call reports its failure with the traceback, although only the first one is logged
        assert list(failures) == ["boom"] and "Traceback" in failures["boom"] and "_boom" in failures["boom"]
    recs = [r for r in caplog.records if "boom" in r.getMessage()]
    assert len(recs) == 1 and recs[0].exc_info is not None


def test_score_batch_nan_and_length(caplog):
    total, valid, per, errors, _ = score_batch([("nan", _nan, 1.0), ("ones", _ones, 1.0)], ["a", "b", "c"], {})
    assert valid == [True, False, False] and total == [2.0, 0.0, 0.0] and errors == 1
    assert math.isnan(per["nan"][1])
    total, valid, _per, errors, _ = score_batch([("short", _short, 1.0)], ["a", "b"], {})
    assert valid == [False, False] and errors == 1
    assert any("short" in r.getMessage() for r in caplog.records)


def test_score_batch_strict():
    with pytest.raises(RuntimeError, match="boom"):
        score_batch([("boom", _boom, 1.0)], ["a"], {}, strict=True)
    with pytest.raises(RuntimeError, match="short"):
        score_batch([("short", _short, 1.0)], ["a", "b"], {}, strict=True)


def test_resolve_reward():
    assert resolve_reward("accuracy") is REWARD_REGISTRY["accuracy"]
    assert resolve_reward("reasonrl.rewards.math:format_reward") is format_reward
    with pytest.raises(ValueError, match="accuracy"):
        resolve_reward("nope")
    with pytest.raises(ValueError, match="no_such_mod"):
        resolve_reward("no_such_mod:f")
    with pytest.raises(ValueError, match="missing"):
        resolve_reward("reasonrl.rewards.math:missing")


def test_closeness_reward_hand_computed():
    from reasonrl.rewards.math import closeness_reward

    got = closeness_reward(["#### 110", "so 100", "no number", "#### -50", "#### 0"], ["100", "100", "100", "100", "0"])
    assert got == [0.9, 1.0, 0.0, 0.0, 1.0]
    assert closeness_reward(["#### 3"], ["0"]) == [0.0]  # |gold| < 1: scale 1, so error 3 -> no credit


def test_math_verify_errors_are_counted_and_logged_once(monkeypatch, caplog):
    import math_verify

    from reasonrl.rewards import math as math_rewards

    def broken(*args, **kwargs):
        raise TypeError("grader broke")

    monkeypatch.setattr(math_verify, "parse", broken)
    monkeypatch.setattr(math_rewards, "_grader_error_logged", False)
    math_rewards.take_grader_errors()
    caplog.set_level(logging.WARNING, logger="reasonrl.rewards")
    # symbolic answers go to math_verify; its failure falls back to string equality and is counted
    assert math_rewards.answers_match("\\frac{1}{2}", "\\frac{1}{2}") is True
    assert math_rewards.answers_match("x + 1", "1 + x") is False
    assert math_rewards.answers_match("12", "12.0") is True  # numeric: math_verify not asked
    assert math_rewards.take_grader_errors() == 2 and math_rewards.take_grader_errors() == 0
    assert len([r for r in caplog.records if "math_verify failed" in r.getMessage()]) == 1
    # each thread counts its own (asynchronous training scores in a worker thread and the main thread at once)
    import threading

    taken = {}

    def score_in_a_worker():
        math_rewards.answers_match("x + 1", "1 + x")
        taken["worker"] = math_rewards.take_grader_errors()

    worker = threading.Thread(target=score_in_a_worker)
    worker.start()
    worker.join()
    assert taken == {"worker": 1} and math_rewards.take_grader_errors() == 0
