"""An environment that lets the model try again: "Wrong, try again." after a wrong answer, up to `max_tries` turns.

The answer of each turn is read and compared the way the `accuracy` reward does it (`extract_answer`,
`answers_match` from reasonrl.rewards.math). The episode's score is `decay ** (k - 1)` when turn k was the first
right one (1.0 on the first try, 0.5 on the second with the default decay), else 0.0.
"""

from __future__ import annotations

from reasonrl.envs.base import Environment, EpisodeState
from reasonrl.rewards.math import answers_match, extract_answer

__all__ = ["RETRY_MESSAGE", "RetryEnv"]

RETRY_MESSAGE = "Wrong, try again."


class RetryEnv(Environment):
    """Feedback after each wrong answer until the model is right or has used `max_tries` turns.

    `respond` reads `state.turns` as the number of assistant turns including the one just written, and records
    the first right turn in `state.info["solved_at"]` (1-based).
    """

    def __init__(self, max_tries: int = 3, decay: float = 0.5, mode: str = "lenient"):
        if max_tries < 1:
            raise ValueError(f"max_tries must be at least 1, got {max_tries}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.max_tries = max_tries
        self.decay = decay
        self.mode = mode  # the answer extraction mode (reasonrl.rewards.math.extract_answer)

    def is_right(self, text: str, state: EpisodeState) -> bool:
        return answers_match(extract_answer(text, mode=self.mode), str(state.row["answer"]))

    def respond(self, state: EpisodeState, text: str) -> list[dict] | None:
        if self.is_right(text, state):
            state.info.setdefault("solved_at", state.turns)
            return None
        if state.turns < self.max_tries:
            return [{"role": "user", "content": RETRY_MESSAGE}]
        return None

    def score(self, state: EpisodeState) -> float:
        solved_at = state.info.get("solved_at") or self._first_right_turn(state)
        return self.decay ** (solved_at - 1) if solved_at else 0.0

    def _first_right_turn(self, state: EpisodeState) -> int | None:
        """The first right assistant turn (1-based) read from the messages: for episodes whose last turn
        `respond` never saw (the runner stopped them)."""
        for turn, text in enumerate(state.assistant_texts, start=1):
            if self.is_right(text, state):
                return turn
        return None
