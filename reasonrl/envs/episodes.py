"""The episode runner: G episodes per data row, run together, token-in-token-out.

Each round hands every episode that is ready (not waiting on a tool or on the environment) to one batched engine
call; the model's tokens are kept exactly as sampled, with their log-probs (and entropies and policy versions when
the engine has them). After its turn an episode either calls tools (when the turn holds tool calls) or hears from
the environment (`respond`); both run in a thread pool, so while one episode waits on a tool the others are
decoding in the next round. What the environment says comes back as the chat template's delta (reasonrl/envs/tito.py)
or, in the plain text tool format, as a `<result>...</result>` continuing the model's turn. Nothing is
re-tokenised from text.

Limits: `max_turns` assistant turns, `max_turn_tokens` per turn, `max_episode_tokens` after the prompt (model and
environment tokens together; running out ends the episode with finish reason "length", like a completion cut by
max_new_tokens), `max_tool_calls` per episode, a timeout per tool call, `max_result_chars` per tool result. A tool
or environment that raises, hangs or floods ends as a counted outcome of its episode, never as a crashed step.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent import futures
from dataclasses import dataclass, field

from reasonrl.envs.base import Environment, EpisodeState
from reasonrl.envs.tito import encode_text, end_of_turn_text, first_prompt_ids, turn_delta_ids
from reasonrl.envs.tools import (
    TEXT_TOOL_CLOSE,
    ToolResult,
    as_tools,
    parse_hermes_calls,
    parse_text_calls,
    render_text_result,
    run_tool_call,
    text_tool_instructions,
)
from reasonrl.envs.worked_examples import inline_tool_turns
from reasonrl.rollout.base import SamplingParams

logger = logging.getLogger("reasonrl.envs")

CALL_SEED_STRIDE = 15_485_863  # seed offset between two engine calls of one step's episodes


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4
    max_turn_tokens: int = 256
    max_episode_tokens: int = 1024
    max_tool_calls: int = 8
    tool_timeout_s: float = 10.0
    max_result_chars: int = 2000
    tool_format: str = "text"  # "hermes" (the chat template's tool format) or "text" (<tool>...</tool>)


@dataclass
class Episode:
    """One episode's tokens (everything after the prompt), which of them the model sampled, and its state."""

    prompt_ids: list[int]
    state: EpisodeState
    ids: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)  # True: sampled by the model; False: environment tokens
    logprobs: list[float] = field(default_factory=list)  # 0.0 on environment tokens
    entropies: list[float] | None = field(default_factory=list)  # None once a turn came without entropies
    versions: list[int] = field(default_factory=list)
    finish_reason: str = "stop"  # "length": a token budget cut the episode
    turn_limit: bool = False  # ended by max_turns while the model or the environment wanted to go on
    env_errors: int = 0  # raises of the environment's respond or score
    reward: float | None = None  # the environment's own score plus its per-turn rewards (None: not scored)
    done: bool = False
    pending: futures.Future | None = None
    last_turn_ids: list[int] = field(default_factory=list)  # the model's latest turn

    @property
    def ready(self) -> bool:
        """Waiting for its next model turn (not ended, no tool or environment turn running)."""
        return not self.done and self.pending is None

    @property
    def model_tokens(self) -> int:
        return sum(self.sampled)

    @property
    def env_tokens(self) -> int:
        return len(self.ids) - self.model_tokens

    def model_text(self) -> str:
        """The model's own words over every turn (what the recipe's reward functions grade)."""
        return "\n".join(self.state.assistant_texts)


class EpisodeRunner:
    """Runs a step's episodes for one environment through any rollout engine (reasonrl/rollout/base.py)."""

    def __init__(self, env: Environment, tokenizer, *, limits: EpisodeLimits, template: str, eos_ids: set[int],
                 workers: int = 16):
        self.env, self.tokenizer, self.limits, self.template = env, tokenizer, limits, template
        self.eos_ids = eos_ids
        self.tools = {tool.name: tool for tool in as_tools(env.tools)}
        self.schemas = [tool.schema for tool in self.tools.values()] if limits.tool_format == "hermes" else None
        self.pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reasonrl-env")

    # ------------------------------------------------------------------------------------------------ running
    def run(self, engine, rows: list[dict], params: SamplingParams, *, group_size: int, version: int = 0,
            logits_processors=None) -> list[Episode]:
        """`group_size` episodes per row (row-major), run to their end, then scored."""
        episodes = [self.start(row) for row in rows for _ in range(group_size)]
        calls = 0
        while not all(e.done for e in episodes):
            self._absorb(episodes, block=not any(e.ready for e in episodes))
            ready = [e for e in episodes if e.ready]
            if ready:
                self._model_turn(engine, ready, params, calls, version, logits_processors)
                calls += 1
        for episode in episodes:
            self._score(episode)
        return episodes

    def start(self, row: dict) -> Episode:
        messages = self.env.start(row, self.template)
        if self.tools and self.limits.tool_format == "text":  # worked examples' tool calls written as text
            tools = list(self.tools.values())
            messages = with_instructions(inline_tool_turns(messages, tools), text_tool_instructions(tools))
        state = EpisodeState(row=row, messages=[dict(m) for m in messages])
        return Episode(first_prompt_ids(self.tokenizer, messages, tools=self.schemas), state)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # --------------------------------------------------------------------------------------------- model turns
    def _model_turn(self, engine, ready: list[Episode], params: SamplingParams, call: int, version: int,
                    logits_processors) -> None:
        """One batched engine call continuing every ready episode from its tokens so far."""
        stop = tuple(params.stop) + ((TEXT_TOOL_CLOSE,) if self.tools and self.limits.tool_format == "text" else ())
        seed = None if params.seed is None else params.seed + CALL_SEED_STRIDE * call
        turn_params = dataclasses.replace(params, n=1, seed=seed, stop=stop)
        budgets = [self._turn_budget(e) for e in ready]
        out = engine.generate([e.prompt_ids + e.ids for e in ready], turn_params, budgets, logits_processors)
        for i, episode in enumerate(ready):
            entropies = None if out.entropies is None else out.entropies[i]
            versions = [version] * len(out.completion_ids[i]) if out.versions is None else out.versions[i]
            self._append_model(episode, out.completion_ids[i], out.logprobs[i], entropies, versions)
            self._after_model_turn(episode, out.finish_reasons[i])

    def _turn_budget(self, episode: Episode) -> int:
        return max(1, min(self.limits.max_turn_tokens, self.limits.max_episode_tokens - len(episode.ids)))

    def _append_model(self, episode: Episode, ids, logprobs, entropies, versions) -> None:
        episode.last_turn_ids = list(ids)
        episode.ids += ids
        episode.sampled += [True] * len(ids)
        episode.logprobs += list(logprobs)
        episode.versions += list(versions)
        if episode.entropies is not None:
            episode.entropies = None if entropies is None else episode.entropies + list(entropies)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        episode.state.messages.append({"role": "assistant", "content": text})
        episode.state.turns += 1

    def _after_model_turn(self, episode: Episode, finish_reason: str) -> None:
        """What follows a model turn: the end of the episode, its tool calls, or the environment's answer."""
        state, limits = episode.state, self.limits
        if finish_reason == "length" and len(episode.ids) >= limits.max_episode_tokens:
            return self._end(episode, "length")
        calls = self._tool_calls(state.last_text) if self.tools and finish_reason != "length" else []
        if state.turns >= limits.max_turns:
            episode.turn_limit = bool(calls) or finish_reason == "length"
            return self._end(episode, "length" if finish_reason == "length" else "stop")
        if calls:
            episode.pending = self.pool.submit(self._run_tools, state, calls)
        elif finish_reason == "length":  # the turn's own budget ran out mid-answer: nothing to respond to
            self._end(episode, "length")
        else:
            episode.pending = self.pool.submit(self._respond, state)

    def _tool_calls(self, text: str) -> list:
        if self.limits.tool_format == "hermes":
            return parse_hermes_calls(text)
        return parse_text_calls(text, list(self.tools.values()))

    # -------------------------------------------------------------------------------------- environment turns
    def _run_tools(self, state: EpisodeState, calls: list) -> tuple[str, list[dict]]:
        """After a turn with tool calls: their results, in order (in a worker thread)."""
        results = [{"role": "tool", "content": self._call(state, call).text} for call in calls]
        return ("inline" if self.limits.tool_format == "text" else "chat"), results

    def _call(self, state: EpisodeState, call) -> ToolResult:
        state.tool_calls += 1
        if state.tool_calls > self.limits.max_tool_calls:
            result = ToolResult(text=f"error: no more tool calls (at most {self.limits.max_tool_calls} per "
                                "episode)", error="limit")
        else:
            result = run_tool_call(call, list(self.tools.values()), timeout_s=self.limits.tool_timeout_s,
                                   max_chars=self.limits.max_result_chars)
        state.tool_errors += result.error is not None
        return result

    def _respond(self, state: EpisodeState) -> tuple[str, list[dict]] | None:
        """After a turn without tool calls: what the environment says (in a worker thread); None ends."""
        replies = self.env.respond(state, state.last_text)
        return None if not replies else ("chat", [dict(m) for m in replies])

    def _reply_ids(self, episode: Episode, kind: str, replies: list[dict]) -> list[int]:
        """The token ids of the environment's turn (in the main thread: the tokenizer is not shared across
        threads): inline tool results continue the model's turn; chat replies are the template's delta."""
        state = episode.state
        if kind == "inline":
            ids = encode_text(self.tokenizer, "".join(render_text_result(m["content"]) for m in replies))
        else:
            sampled_end = end_of_turn_text(self.tokenizer, episode.last_turn_ids, self.eos_ids)
            ids = turn_delta_ids(self.tokenizer, state.messages, replies, sampled_end=sampled_end,
                                 tools=self.schemas)
        state.messages += replies
        return ids

    def _absorb(self, episodes: list[Episode], *, block: bool) -> None:
        """Fold finished tool and environment turns into their episodes (waiting for one when none is ready)."""
        pending = [e.pending for e in episodes if e.pending is not None]
        if block and pending:
            futures.wait(pending, return_when=futures.FIRST_COMPLETED)
        for episode in episodes:
            if episode.pending is not None and episode.pending.done():
                self._absorb_one(episode)

    def _absorb_one(self, episode: Episode) -> None:
        future, episode.pending = episode.pending, None
        try:
            reply = future.result()
        except Exception as exc:  # noqa: BLE001 - the environment raised: the episode ends, counted and logged
            episode.env_errors += 1
            logger.warning("environment %s raised on an episode: %s: %s", type(self.env).__name__,
                           type(exc).__name__, exc)
            return self._end(episode, "stop")
        if reply is None:
            return self._end(episode, "stop")
        ids = self._reply_ids(episode, *reply)
        room = self.limits.max_episode_tokens - len(episode.ids)
        self._append_env(episode, ids[:room])
        if len(ids) >= room:
            self._end(episode, "length")

    def _append_env(self, episode: Episode, ids: list[int]) -> None:
        episode.ids += ids
        episode.sampled += [False] * len(ids)
        episode.logprobs += [0.0] * len(ids)
        episode.versions += [episode.versions[-1] if episode.versions else 0] * len(ids)
        if episode.entropies is not None:
            episode.entropies += [0.0] * len(ids)

    def _end(self, episode: Episode, finish_reason: str) -> None:
        episode.done, episode.finish_reason = True, finish_reason

    def _score(self, episode: Episode) -> None:
        state = episode.state
        try:
            own = self.env.score(state)
        except Exception as exc:  # noqa: BLE001 - a failed score is an invalid reward, counted
            episode.env_errors += 1
            episode.reward = float("nan")  # an invalid reward: the sample takes no part in training
            logger.warning("environment %s raised scoring an episode: %s: %s", type(self.env).__name__,
                           type(exc).__name__, exc)
            return
        if own is not None or state.turn_rewards:
            episode.reward = float(own or 0.0) + float(sum(state.turn_rewards))


def with_instructions(messages: list[dict], instructions: str) -> list[dict]:
    """The tool instructions as the system message (appended to one the messages already start with)."""
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + instructions}, *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]
