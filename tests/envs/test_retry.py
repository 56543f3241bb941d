"""RetryEnv: feedback after wrong answers, the end after a right one or `max_tries` turns, the decayed score."""

import pytest

from reasonrl.envs.base import EpisodeState
from reasonrl.envs.retry import RETRY_MESSAGE, RetryEnv

RETRY = [{"role": "user", "content": "Wrong, try again."}]


def episode(*answers: str, gold: str = "42") -> EpisodeState:
    """A state after the given assistant turns, each followed by the retry message but the last."""
    messages = [{"role": "user", "content": "What is 6 * 7?"}]
    for i, text in enumerate(answers):
        messages.append({"role": "assistant", "content": text})
        if i < len(answers) - 1:
            messages.append({"role": "user", "content": RETRY_MESSAGE})
    return EpisodeState(row={"question": "What is 6 * 7?", "answer": gold}, messages=messages, turns=len(answers))


def play(env: RetryEnv, *answers: str, gold: str = "42") -> tuple[EpisodeState, list]:
    """Run the answers through `respond` as the episode runner would; stop when the env ends the episode."""
    state = episode(gold=gold)
    replies = []
    for text in answers:
        state.messages.append({"role": "assistant", "content": text})
        state.turns += 1
        reply = env.respond(state, text)
        replies.append(reply)
        if reply is None:
            break
        state.messages.extend(reply)
    return state, replies


def test_retry_message():
    assert RETRY_MESSAGE == "Wrong, try again."


def test_right_first_time_ends_with_full_score():
    env = RetryEnv()
    state, replies = play(env, "6 * 7 = 42. #### 42")
    assert replies == [None]
    assert state.info["solved_at"] == 1
    assert env.score(state) == 1.0


def test_wrong_then_right_gets_the_decayed_score():
    env = RetryEnv()
    state, replies = play(env, "#### 41", "Let me recount: \\boxed{42}")
    assert replies == [RETRY, None]
    assert state.info["solved_at"] == 2
    assert env.score(state) == 0.5


def test_right_on_the_last_try():
    env = RetryEnv(max_tries=3, decay=0.5)
    state, replies = play(env, "40", "41", "the answer is 42")
    assert replies == [RETRY, RETRY, None]
    assert env.score(state) == 0.25


def test_always_wrong_ends_after_max_tries_with_zero():
    env = RetryEnv(max_tries=3)
    state, replies = play(env, "1", "2", "3", "4", "5")
    assert replies == [RETRY, RETRY, None]
    assert state.turns == 3
    assert "solved_at" not in state.info
    assert env.score(state) == 0.0


def test_one_try_means_no_feedback():
    env = RetryEnv(max_tries=1)
    state, replies = play(env, "#### 7")
    assert replies == [None]
    assert env.score(state) == 0.0


def test_custom_decay_and_more_tries():
    env = RetryEnv(max_tries=5, decay=0.8)
    state, replies = play(env, "1", "2", "3", "#### 42")
    assert replies == [RETRY, RETRY, RETRY, None]
    assert env.score(state) == pytest.approx(0.8 ** 3)


def test_decay_zero_only_rewards_the_first_try():
    env = RetryEnv(decay=0.0)
    assert env.score(play(env, "42")[0]) == 1.0
    assert env.score(play(env, "41", "42")[0]) == 0.0


def test_answers_compare_like_the_accuracy_reward():
    env = RetryEnv()
    assert env.respond(episode("#### 1,234.0", gold="1234"), "#### 1,234.0") is None  # commas and .0
    assert env.respond(episode("\\boxed{\\frac{1}{2}}", gold="0.5"), "\\boxed{\\frac{1}{2}}") is None
    assert env.respond(episode("no number at all"), "no number at all") == RETRY
    assert env.respond(episode("#### 42.5"), "#### 42.5") == RETRY


def test_numeric_gold_answers_are_compared_as_text():
    env = RetryEnv()
    state = episode("#### 42", gold="42")
    state.row["answer"] = 42
    assert env.respond(state, "#### 42") is None
    assert env.score(state) == 1.0


def test_extraction_mode_is_passed_on():
    env = RetryEnv(mode="hash")
    text = "I think 42, #### 41"
    assert env.respond(episode(text), text) == RETRY  # "hash" reads 41, not the last number
    boxed = RetryEnv(mode="boxed")
    assert boxed.respond(episode("#### 42"), "#### 42") == RETRY  # no \\boxed{}


def test_score_from_the_messages_when_respond_did_not_see_the_last_turn():
    env = RetryEnv()
    assert env.score(episode("1", "2", "#### 42")) == 0.25  # e.g. the runner's turn cap ended it
    assert env.score(episode("1", "42", "43")) == 0.5  # the first right turn counts
    assert env.score(episode("1", "2")) == 0.0
    assert env.score(episode()) == 0.0


def test_recorded_turn_wins_over_later_turns():
    env = RetryEnv()
    state = episode("41", "42")
    state.info["solved_at"] = 2
    assert env.score(state) == 0.5
    state.turns = 3
    env.respond(state, "#### 42")  # a later right answer does not move the recorded turn
    assert state.info["solved_at"] == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_tries": 0}, "max_tries must be at least 1"),
    ({"decay": 1.5}, r"decay must be in \[0, 1\]"),
    ({"decay": -0.1}, r"decay must be in \[0, 1\]"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryEnv(**kwargs)


def test_defaults():
    env = RetryEnv()
    assert (env.max_tries, env.decay, env.mode) == (3, 0.5, "lenient")
    assert env.tools == []
