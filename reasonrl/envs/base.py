"""The environment protocol: what an episode's other side does, in plain Python.

An episode starts from a data row: the environment gives the first messages (and the tools the model may call).
The model answers; after each assistant turn the episode runner (reasonrl/envs/episodes.py) either runs the tool
calls in that turn (tools are plain Python functions, reasonrl/envs/tools.py) or asks the environment to
`respond`: with messages (feedback, a new question), or with None to end the episode. When the episode ends the
environment `score`s it. Nothing here knows about tokens: the runner keeps the token ids (token-in-token-out).

Writing one needs no framework:

    class Retry(Environment):
        def respond(self, state, text):
            if state.turns >= 3 or is_right(text, state.row["answer"]):
                return None
            return [{"role": "user", "content": "Wrong, try again."}]

        def score(self, state):
            return 1.0 if is_right(state.last_text, state.row["answer"]) else 0.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from reasonrl.data.prompts import build_prompt


@dataclass
class EpisodeState:
    """What the environment may read about its episode (one per episode, also the environment's scratch space)."""

    row: dict  # the data row the episode started from (question, answer, ...)
    messages: list[dict]  # the conversation so far: the first messages, assistant turns (text), environment replies
    turns: int = 0  # assistant turns so far
    tool_calls: int = 0
    tool_errors: int = 0  # tool calls that raised, timed out, named no known tool or could not be parsed
    turn_rewards: list[float] = field(default_factory=list)  # per-turn rewards the environment added (summed)
    info: dict = field(default_factory=dict)  # free for the environment

    @property
    def assistant_texts(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    @property
    def last_text(self) -> str:
        texts = self.assistant_texts
        return texts[-1] if texts else ""


class Environment:
    """Base class (and protocol) of an environment. Every method has a default: a plain environment with tools only
    needs `tools`; one that talks back overrides `respond`; one that grades itself overrides `score`."""

    tools: ClassVar[list[Callable]] = []  # plain Python functions (typed arguments, a Google-style docstring)
    template: str | None = None  # the first user message, formatted with the row (None: the recipe's data.template)

    def start(self, row: dict, template: str) -> list[dict]:
        """The episode's first messages (default: one user turn from the template)."""
        return build_prompt(row["question"], self.template or template)

    def respond(self, state: EpisodeState, text: str) -> list[dict] | None:
        """After an assistant turn without tool calls: the environment's messages, or None to end the episode
        (default: end)."""
        return None

    def score(self, state: EpisodeState) -> float | None:
        """The finished episode's own reward (added to the per-turn rewards), or None when the recipe's reward
        functions grade it (default) from the model's text."""
        return None
