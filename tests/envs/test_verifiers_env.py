"""verifiers environments behind our protocol (reasonrl/envs/verifiers_env.py), with small vf environments built
here (no download): a SingleTurnEnv, a ToolEnv with calculator-like tools, a MultiTurnEnv that asks once more; then
a ToolEnv episode through the EpisodeRunner with a scripted engine."""

from __future__ import annotations

import json
import signal
import sys
import types

import datasets
import pytest
import verifiers as vf

from reasonrl.envs import load_environment
from reasonrl.envs.base import EpisodeState
from reasonrl.envs.episodes import EpisodeLimits, EpisodeRunner, with_instructions
from reasonrl.envs.tito import encode_text
from reasonrl.envs.verifiers_env import (
    VerifiersEnvironment,
    _signal_handlers_kept,
    import_verifiers,
    load_verifiers_env,
)
from reasonrl.rollout.base import RolloutOutput, SamplingParams

ROWS = [{"question": "2 + 3", "answer": "5"}, {"question": "4 * 6", "answer": "24"},
        {"question": "9 - 7", "answer": "2"}]
SYSTEM = "Answer with the number only."


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """A vf environment built here replaces this process's SIGINT/SIGTERM handlers: put them back after."""
    with _signal_handlers_kept():
        yield


def exact(completion, answer) -> float:
    """1.0 when the last assistant message is the answer."""
    texts = [m["content"] for m in completion if m["role"] == "assistant"]
    return 1.0 if texts and texts[-1].strip() == answer else 0.0


def rubric() -> vf.Rubric:
    return vf.Rubric(funcs=[exact], weights=[1.0])


def arithmetic(rows=ROWS):
    return datasets.Dataset.from_list(list(rows))


@pytest.fixture
def single_turn(monkeypatch):
    """A SingleTurnEnv loaded by id through vf.load_environment (its module put in sys.modules)."""
    def build(**args):
        return vf.SingleTurnEnv(dataset=arithmetic(), eval_dataset=arithmetic(ROWS[:1]), system_prompt=SYSTEM,
                                rubric=rubric(), **args)

    monkeypatch.setitem(sys.modules, "tiny_arithmetic", types.SimpleNamespace(load_environment=build))
    return load_verifiers_env("tiny-arithmetic", {})


def episode(env, row, *turns) -> EpisodeState:
    """An episode's state after `turns` (assistant texts, or message dicts for other roles)."""
    messages = env.start(row, "{question}")
    for turn in turns:
        messages.append({"role": "assistant", "content": turn} if isinstance(turn, str) else turn)
    return EpisodeState(row=row, messages=messages, turns=sum(isinstance(t, str) for t in turns))


# ------------------------------------------------------------------------------------------------- single turn
def test_single_turn_rows(single_turn):
    train, evals = single_turn.rows("train"), single_turn.rows("eval")
    assert [r["question"] for r in train] == ["2 + 3", "4 * 6", "9 - 7"]
    assert [r["answer"] for r in train] == ["5", "24", "2"]
    assert train[0]["prompt"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "2 + 3"}]
    assert train[1]["info"] == {} and train[2]["example_id"] == 2
    assert [r["question"] for r in evals] == ["2 + 3"]
    with pytest.raises(ValueError, match="split='test'"):
        single_turn.rows("test")


def test_single_turn_start_respond_score(single_turn):
    row = single_turn.rows("train")[1]
    assert single_turn.start(row, "ignored {question}") == row["prompt"]
    right = episode(single_turn, row, "24")
    assert single_turn.respond(right, "24") is None
    assert right.info["vf_state"]["stop_condition"] == "max_turns_reached"
    assert single_turn.score(right) == 1.0
    assert right.info["vf_scores"] == {"exact": 1.0, "num_turns": 1.0}
    wrong = episode(single_turn, row, "25")
    assert single_turn.score(wrong) == 0.0  # scored without a respond first
    assert wrong.info["vf_scores"]["exact"] == 0.0
    assert wrong.info["vf_state"]["completion"][0]["content"] == "25"


def test_loading_keeps_our_signal_handlers(monkeypatch):
    def ours(sig, frame):
        pass

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        monkeypatch.setitem(sys.modules, "tiny_signals", types.SimpleNamespace(
            load_environment=lambda: vf.SingleTurnEnv(dataset=arithmetic(), rubric=rubric())))
        load_verifiers_env("tiny_signals", {})
        assert signal.getsignal(signal.SIGTERM) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_unknown_env_id_names_it_and_the_import_error():
    with pytest.raises(ValueError, match=r"'no-such-vf-env' did not load.*ModuleNotFoundError.*no_such_vf_env"):
        load_environment("verifiers", "no-such-vf-env", {})


def test_missing_verifiers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "verifiers", None)
    with pytest.raises(ValueError, match=r"pip install verifiers==0\.3\.1"):
        import_verifiers()


# ------------------------------------------------------------------------------------------------------- tools
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


async def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


@pytest.fixture
def tool_env() -> VerifiersEnvironment:
    return VerifiersEnvironment(vf.ToolEnv(dataset=arithmetic(), tools=[add, multiply], rubric=rubric(), max_turns=4))


def hermes_call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def test_tool_env_exposes_callable_tools(tool_env):
    assert [t.name for t in tool_env.tools] == ["add", "multiply"]
    schema = tool_env.tools[0].schema["function"]
    assert schema["description"] == "Add two integers."
    assert schema["parameters"]["properties"]["a"]["type"] == "integer"
    assert schema["parameters"]["required"] == ["a", "b"]
    assert tool_env.tools[0](a=2, b=3) == 5
    assert tool_env.tools[1](a=4, b=6) == 24  # an async vf tool, run on the adapter's loop


def test_tool_env_turns_map_to_vf_steps(tool_env):
    row = tool_env.rows("train")[1]
    state = episode(tool_env, row, hermes_call("multiply", a=4, b=6), {"role": "tool", "content": "24"}, "24")
    assert tool_env.respond(state, "24") is None  # a turn without calls: vf's no_tools_called
    vf_state = state.info["vf_state"]
    assert vf_state["stop_condition"] == "no_tools_called"
    first, second = vf_state["trajectory"]
    [call] = first["completion"][0].tool_calls
    assert (call.name, json.loads(call.arguments)) == ("multiply", {"a": 4, "b": 6})
    assert second["prompt"][-1].role == "tool" and second["prompt"][-1].tool_call_id == call.id
    assert tool_env.score(state) == 1.0
    assert state.info["vf_scores"]["total_tool_calls"] == 1.0
    assert state.info["vf_scores"]["multiply_calls"] == 1.0 and state.info["vf_scores"]["add_calls"] == 0.0


def test_tool_env_text_calls_after_a_prefixed_system_message(tool_env):
    """The runner's text format puts the tool instructions in a system message vf's prompt does not have."""
    row = tool_env.rows("train")[0]
    messages = with_instructions(tool_env.start(row, ""), "You can use these tools: ...")
    messages += [{"role": "assistant", "content": '<tool>add: {"a": 2, "b": 3}</tool>'},
                 {"role": "tool", "content": "5"}, {"role": "assistant", "content": "5"}]
    state = EpisodeState(row=row, messages=messages, turns=2)
    assert tool_env.score(state) == 1.0
    vf_state = state.info["vf_state"]
    assert [m.role for m in vf_state["completion"]] == ["assistant", "tool", "assistant"]
    assert vf_state["completion"][0].tool_calls[0].name == "add"
    assert state.info["vf_scores"]["add_calls"] == 1.0


# ------------------------------------------------------------------------------------------------- multi turn
class AskAgain(vf.MultiTurnEnv):
    """Says "try again" once, then stops."""

    async def setup_state(self, state):
        state["asked"] = 0
        return state

    @vf.stop
    async def asked_once(self, state) -> bool:
        return state["asked"] >= 1

    async def env_response(self, messages, state, **kwargs):
        state["asked"] += 1
        return [{"role": "user", "content": "try again"}]


def test_multi_turn_env_asks_once_then_ends():
    env = VerifiersEnvironment(AskAgain(dataset=arithmetic(), rubric=rubric(), max_turns=5))
    row = env.rows("train")[0]
    state = episode(env, row, "6")
    assert env.respond(state, "6") == [{"role": "user", "content": "try again"}]
    state.messages += [{"role": "user", "content": "try again"}, {"role": "assistant", "content": "5"}]
    state.turns = 2
    assert env.respond(state, "5") is None
    vf_state = state.info["vf_state"]
    assert vf_state["stop_condition"] == "asked_once" and len(vf_state["trajectory"]) == 2
    assert env.score(state) == 1.0
    assert [m["content"] for m in vf_state["completion"]] == ["6", "try again", "5"]
    assert state.info["vf_scores"]["num_turns"] == 2.0


# ---------------------------------------------------------------------------------------------- with the runner
class ScriptedEngine:
    """Answers each prompt with the next reply of `script` (one per turn; one episode)."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, list(script)

    def generate(self, prompt_ids, params, max_new_tokens, logits_processors=None):
        ids = [encode_text(self.tokenizer, self.script.pop(0) + "<|im_end|>") for _ in prompt_ids]
        return RolloutOutput(ids, [[-0.5] * len(i) for i in ids], ["stop"] * len(ids))


def test_tool_env_episode_through_the_runner(tool_env):
    from reasonrl.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    row = tool_env.rows("train")[1]
    engine = ScriptedEngine(tok, [hermes_call("multiply", a=4, b=6), "24"])
    runner = EpisodeRunner(tool_env, tok, limits=EpisodeLimits(tool_format="hermes"), template="{question}",
                           eos_ids={tok.convert_tokens_to_ids("<|im_end|>")})
    try:
        [ep] = runner.run(engine, [row], SamplingParams(seed=0), group_size=1)
    finally:
        runner.close()
    assert ep.state.turns == 2 and ep.state.tool_calls == 1 and ep.state.tool_errors == 0
    assert ep.state.messages[-2] == {"role": "tool", "content": "24"}
    assert ep.reward == 1.0 and ep.env_errors == 0
    assert ep.state.info["vf_scores"]["multiply_calls"] == 1.0
