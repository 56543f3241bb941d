"""Environments of the `verifiers` package (prime-rl's environment library) as reasonrl environments.

`load_verifiers_env(env_id, args)` loads one with `vf.load_environment(env_id, **args)` and wraps it in
`VerifiersEnvironment`, which takes from it only what is not generation: its data sets and prompts (system prompt
included), its multi-turn protocol (`is_completed`, `env_response`, the state `setup_state` prepares), its tools and
its rubric. The model's turns come from our engines and the token ids stay ours (reasonrl/envs/episodes.py);
verifiers' client is never called (the vf state holds a client that refuses to generate).

The classic verifiers API (`SingleTurnEnv`, `MultiTurnEnv`, `ToolEnv`, `Rubric`) is what this adapter speaks; it is
`import verifiers as vf` in 0.3.1 (the package keeps it in `verifiers.legacy` and aliases it at the top level).
verifiers 0.4.0 removed it for the `verifiers.v1` stack (tasksets, harness programs that call the model through an
interception server), which has no turn-by-turn protocol to adapt, hence the pin `verifiers==0.3.1`, installed
with --no-deps (its own pins would downgrade mcp and websockets under vLLM; scripts/setup.sh lists the few
dependencies it needs to import).

How an episode maps (our `EpisodeState` -> the vf state, kept in `state.info["vf_state"]`):
- `rows(split)`: the env's `get_dataset()` ("train") or `get_eval_dataset()` ("eval"; vf falls back to the train set
  when there is none) as plain dicts: every dataset column, "prompt" the vf prompt messages, "info" a dict,
  "answer" ("" when absent), and "question" the last user message's text (for logging) when the data set has none.
- `start(row)`: the vf prompt messages as they are (our template is not used).
- Each assistant message of our conversation becomes one vf trajectory step (`add_trajectory_step`) whose prompt is
  everything before it, so vf's `max_turns` and stop conditions count what ours count.
- `respond`: vf's `is_completed`; None when a stop condition fires, else `env_response` on the conversation. A final
  env response (`state["final_env_response"]`) ends the episode; it reaches the rubric, not the model.
  `SingleTurnEnv` stops after the first turn (max_turns=1), so `respond` is None there.
- `score`: the env's cleanup (which renders `state["completion"]`), `rubric.score_rollout`, the rubric's cleanup;
  returns the weighted reward and puts every function's score (metrics included) in `state.info["vf_scores"]`.

Tools (`ToolEnv`): vf expects OpenAI-style structured `tool_calls` on the assistant message (id, name, JSON
arguments), runs them itself in `env_response` and answers with `role: tool` messages. We instead give vf's tool
functions to our runner as `Tool`s (schemas from vf's own `tool_defs`; async tools run on this adapter's event loop);
the runner parses the calls from the model's text, runs them and feeds the results back, and calls `respond` only
after a turn without calls, where vf's `no_tools_called` stop ends the episode. For the rubric (tool-call counts) the
calls of each tool turn are parsed back from the text (the `<tool_call>` or `<tool>` format) into structured
`tool_calls`, with ids the following tool messages refer to. Not supported: `StatefulToolEnv` (its tools take hidden
arguments that vf injects from its state), environments that are not `MultiTurnEnv`s (`EnvGroup`), and rubrics
with group reward functions (we score one episode at a time).

vf coroutines run on one private event loop per adapter, in its own thread, so the runner's worker threads may call
`respond` (and tools) concurrently and the env's async resources stay on one loop. A vf environment registers
SIGINT/SIGTERM handlers when it is built (so it must be loaded in the main thread); `load_verifiers_env` puts the
previous handlers back, so the trainer's preemption handling is kept (vf's teardown still runs at exit).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from reasonrl.envs.base import Environment, EpisodeState
from reasonrl.envs.tools import Tool, parse_hermes_calls, parse_text_calls

VERIFIERS_PIN = "verifiers==0.3.1"
MODEL_NAME = "reasonrl"  # the model name in the vf state (only verifiers' client would read it)


def load_verifiers_env(env_id: str, args: dict | None = None) -> VerifiersEnvironment:
    """The verifiers environment `env_id` (an installed environment package) built with `args`, as ours."""
    vf = import_verifiers()
    with _signal_handlers_kept():
        try:
            env = vf.load_environment(env_id, **(args or {}))
        except Exception as exc:
            raise ValueError(f"the verifiers environment {env_id!r} did not load: {_with_cause(exc)}") from exc
    return VerifiersEnvironment(env)


def import_verifiers():
    """`verifiers`, with its classic API, or a ValueError that says what to install."""
    try:
        import verifiers as vf
    except ImportError as exc:
        raise ValueError(f"env.source=verifiers needs the verifiers package: pip install {VERIFIERS_PIN} "
                         f"(see scripts/setup.sh for its dependencies); import failed: {exc}") from exc
    try:
        _ = vf.MultiTurnEnv, vf.StatefulToolEnv, vf.load_environment  # lazy attributes: the classic stack
    except AttributeError as exc:
        version = getattr(vf, "__version__", "?")
        raise ValueError(f"verifiers {version} lacks its classic environments (SingleTurnEnv, MultiTurnEnv, "
                         f"ToolEnv; removed in 0.4.0) or their dependencies: pip install {VERIFIERS_PIN} "
                         f"(see scripts/setup.sh); {_with_cause(exc)}") from exc
    return vf


class VerifiersEnvironment(Environment):
    """A classic verifiers environment (`MultiTurnEnv` and its subclasses) behind our protocol."""

    def __init__(self, vf_env):
        vf = import_verifiers()
        _check_supported(vf, vf_env)
        self.env = vf_env
        self.loop = _EventLoop()
        self.tools = self._tools(vf, vf_env)

    # ------------------------------------------------------------------------------------------------- data
    def rows(self, split: str) -> list[dict]:
        """The env's train ("train") or eval ("eval") data set as data rows."""
        if split not in ("train", "eval"):
            raise ValueError(f"split={split!r}: choose 'train' or 'eval'")
        dataset = self.env.get_dataset() if split == "train" else self.env.get_eval_dataset()
        return [as_row(raw) for raw in dataset.to_list()]

    def start(self, row: dict, template: str) -> list[dict]:
        """vf's prompt messages (its system prompt and few-shot turns included); `template` is not used."""
        return [dict(m) for m in row["prompt"]]

    # ------------------------------------------------------------------------------------------- protocol
    def respond(self, state: EpisodeState, text: str) -> list[dict] | None:
        return self.loop.run(self._respond(state))

    def score(self, state: EpisodeState) -> float:
        return self.loop.run(self._score(state))

    async def _respond(self, state: EpisodeState) -> list[dict] | None:
        vf_state = await self._synced(state)
        if await self.env.is_completed(vf_state):
            return None
        last = vf_state["trajectory"][-1]
        replies = await self.env.env_response([*last["prompt"], *last["completion"]], vf_state)
        if vf_state.get("final_env_response") is not None:
            return None
        return [as_dict(m) for m in _vf_messages(replies)]

    async def _score(self, state: EpisodeState) -> float:
        vf_state = await self._synced(state)
        await self.env.cleanup(vf_state)  # vf's render_state: state["completion"] from the trajectory
        await self.env.rubric.score_rollout(vf_state)
        await self.env.rubric.cleanup(vf_state)
        state.info["vf_scores"] = dict(vf_state.get("metrics") or {})
        return float(vf_state["reward"])

    # ---------------------------------------------------------------------------------------------- vf state
    async def _synced(self, state: EpisodeState):
        """The episode's vf state (made on first use), with a trajectory step for every assistant message."""
        vf_state = state.info.get("vf_state")
        if vf_state is None:
            vf_state = await self._new_state(state.row)
            state.info["vf_state"] = vf_state
        conversation = self._conversation(state, vf_state)
        turns = [i for i, m in enumerate(conversation) if m.role == "assistant"][len(vf_state["trajectory"]):]
        for i in turns:
            await self.env.add_trajectory_step(vf_state, _step(vf_state, conversation[:i], conversation[i]))
        return vf_state

    async def _new_state(self, row: dict):
        vf_state = await self.env.init_state(row, _refusing_client(), MODEL_NAME)
        return await self.env.setup_state(vf_state) or vf_state

    def _conversation(self, state: EpisodeState, vf_state) -> list:
        """vf's prompt and, as vf messages, what followed our first messages (the runner may have prefixed a
        system message with tool instructions: it is not part of vf's prompt)."""
        prompt = state.row["prompt"]
        prefixed = state.messages[0]["role"] == "system" and (not prompt or prompt[0]["role"] != "system")
        after = state.messages[len(prompt) + prefixed:]
        return [*vf_state["prompt"], *_vf_messages(_with_tool_calls(after, self.tools))]

    # -------------------------------------------------------------------------------------------------- tools
    def _tools(self, vf, vf_env) -> list[Tool]:
        if not isinstance(vf_env, vf.ToolEnv):
            return []
        return [Tool(name=d.name, func=self._sync(vf_env.tool_map[d.name]), schema=_schema(d))
                for d in vf_env.tool_defs]

    def _sync(self, func: Callable) -> Callable:
        """`func` as a plain function (an async tool runs on the adapter's loop)."""
        if not inspect.iscoroutinefunction(func):
            return func

        @functools.wraps(func)
        def call(**kwargs):
            return self.loop.run(func(**kwargs))

        return call


# ---------------------------------------------------------------------------------------------------------------
# rows and messages


def as_row(raw: dict) -> dict:
    """A vf data set row as ours: clean prompt messages, info a dict, an answer and a readable question."""
    row = dict(raw)
    row["prompt"] = [_clean(m) for m in raw["prompt"]]
    info = raw.get("info")
    row["info"] = json.loads(info) if isinstance(info, str) and info else (info or {})
    row.setdefault("answer", "")
    row.setdefault("question", last_user_text(row["prompt"]))
    return row


def last_user_text(messages: list[dict]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return content_text(users[-1].get("content")) if users else ""


def content_text(content: Any) -> str:
    """A message's text: the string, or its text parts joined."""
    if isinstance(content, str) or content is None:
        return content or ""
    return "\n".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("text"))


def as_dict(message) -> dict:
    """A vf message as a plain chat message dict (unset fields left out)."""
    return message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else dict(message)


def _clean(message: dict) -> dict:
    """An Arrow-stored message without the None fields the column's schema adds (tool_calls, tool_call_id...)."""
    return {k: v for k, v in message.items() if v is not None}


def _vf_messages(messages) -> list:
    from verifiers.types import Message
    from verifiers.utils.message_utils import normalize_messages

    return messages if all(isinstance(m, Message) for m in messages) else normalize_messages(messages)


def _with_tool_calls(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """Our messages with structured `tool_calls` on each assistant turn that tool results follow (parsed back
    from its text), and the results' `tool_call_id`s pointing at them."""
    out, ids = [], []
    for i, message in enumerate(messages):
        message = dict(message)
        if message["role"] == "assistant" and i + 1 < len(messages) and messages[i + 1]["role"] == "tool":
            calls = _parsed_calls(message["content"], tools)
            ids = [f"call_{i}_{k}" for k in range(len(calls))]
            message["tool_calls"] = [{"id": id_, **call} for id_, call in zip(ids, calls, strict=True)]
        elif message["role"] == "tool" and "tool_call_id" not in message:
            message["tool_call_id"] = ids.pop(0) if ids else f"call_{i}"
        out.append(message)
    return out


def _parsed_calls(text: str, tools: list[Tool]) -> list[dict]:
    """The calls in a turn's text, as vf tool calls (name, JSON arguments), in either of our formats."""
    calls = parse_hermes_calls(text) or (parse_text_calls(text, tools) if tools else [])
    return [{"name": c.name or "", "arguments": json.dumps(c.arguments or {})} for c in calls]


def _step(vf_state, prompt: list, message):
    return {"prompt": prompt, "completion": [message], "response": None, "tokens": None, "reward": None,
            "advantage": None, "is_truncated": False, "trajectory_id": vf_state["trajectory_id"], "extras": {}}


def _schema(tool_def) -> dict:
    """A vf tool definition as the OpenAI / transformers function schema our runner and chat templates use."""
    return {"type": "function", "function": {"name": tool_def.name, "description": tool_def.description,
                                             "parameters": tool_def.parameters}}


# ---------------------------------------------------------------------------------------------------------------
# plumbing


def _check_supported(vf, vf_env) -> None:
    name = type(vf_env).__name__
    if not isinstance(vf_env, vf.MultiTurnEnv):
        raise TypeError(f"{name} is not a verifiers MultiTurnEnv (SingleTurnEnv, MultiTurnEnv, ToolEnv): "
                        "reasonrl drives episodes turn by turn")
    if isinstance(vf_env, vf.StatefulToolEnv):
        raise TypeError(f"{name} is a StatefulToolEnv: its tools take arguments verifiers injects from its state, "
                        "which reasonrl's tool runner cannot give")
    if vf_env.rubric.has_group_rewards:
        raise TypeError(f"{name}'s rubric has group reward functions: reasonrl scores one episode at a time")


class _EventLoop:
    """One asyncio loop in a daemon thread; `run` blocks the calling thread (any thread) until its coroutine ends."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="reasonrl-verifiers", daemon=True).start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def _refusing_client():
    """A verifiers client whose every call raises: the vf state needs one, reasonrl generates the turns."""
    from verifiers.clients.client import Client

    def refuse(*args, **kwargs):
        raise RuntimeError("reasonrl generates the model's turns; verifiers' client is never called")

    client_type = type("ReasonrlNoClient", (Client,), dict.fromkeys(Client.__abstractmethods__, refuse))
    return client_type(None)


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Put back the SIGINT/SIGTERM handlers a vf environment replaces when it is built."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread():
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def _with_cause(exc: BaseException) -> str:
    """The error and what caused it (vf wraps the import error of a missing environment package)."""
    cause = exc.__cause__
    return f"{type(exc).__name__}: {exc}" + (f" (caused by {type(cause).__name__}: {cause})" if cause else "")
