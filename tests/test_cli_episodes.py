"""`reasonrl eval --env` and `reasonrl generate --env` on the tiny model (hf engine): episode transcripts, per-turn
metrics, summary metrics that agree with the records, and clear errors for a bad environment or bad --env-args.

The random tiny model never ends a turn or calls a tool by itself, so two copies of it are told to, through their
generation config (real settings of transformers' generate, read by the same engine as ever): one ends every turn
after its first token (every character is an EOS token), so the environment answers each turn; the other writes
`<tool>2*3</tool>` greedily (a bias on each prefix of it, longer prefixes more), so the calculator runs."""

import json
import shutil

import pytest

from reasonrl.cli import main
from reasonrl.envs.base import Environment
from reasonrl.envs.calculator import calculate

FEEDBACK = "Look again."
CALL = "<tool>2*3</tool>"


class FeedbackEnv(Environment):
    """Answers every turn with the same feedback (max_turns ends the episode); scores 0.1 per assistant turn."""

    def respond(self, state, text):
        return [{"role": "user", "content": FEEDBACK}]

    def score(self, state):
        return 0.1 * state.turns


FEEDBACK_ENV = f"{__name__}:FeedbackEnv"


def model_with(src: str, dst, **generation) -> str:
    from transformers import GenerationConfig

    shutil.copytree(src, dst)
    config = GenerationConfig.from_pretrained(dst)
    for key, value in generation.items():
        setattr(config, key, value)
    config.save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def one_token_turns_model(tiny_model_dir, tmp_path_factory):
    from reasonrl.tiny_model import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    every_char = sorted(set(tok.get_vocab().values()) - {tok.pad_token_id, tok.bos_token_id})
    return model_with(tiny_model_dir, tmp_path_factory.mktemp("models") / "one_token_turns", eos_token_id=every_char)


@pytest.fixture(scope="module")
def tool_calling_model(tiny_model_dir, tmp_path_factory):
    from reasonrl.tiny_model import build_tiny_tokenizer

    ids = [build_tiny_tokenizer().convert_tokens_to_ids(c) for c in CALL]
    bias = [[ids[: k + 1], 100.0 * (k + 1)] for k in range(len(ids))]
    return model_with(tiny_model_dir, tmp_path_factory.mktemp("models") / "tool_calling", sequence_bias=bias)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def eval_json(capsys, model: str, *argv) -> dict:
    assert main(["eval", model, "--n", "3", "--json", *argv]) == 0
    return json_lines(capsys.readouterr().out)[-1]


def mean(values) -> float:
    return sum(values) / len(values)


def assert_summary_matches_records(summary: dict) -> None:
    records = summary["records"]
    assert summary["n"] == len(records)
    assert summary["accuracy"] == pytest.approx(mean([r["correct"] for r in records]))
    assert summary["mean_length"] == pytest.approx(mean([r["model_tokens"] for r in records]))
    assert summary["turns_mean"] == pytest.approx(mean([r["turns"] for r in records]))
    assert summary["tool_calls_mean"] == pytest.approx(mean([r["tool_calls"] for r in records]))
    assert summary["tool_call_rate"] == pytest.approx(mean([r["tool_calls"] > 0 for r in records]))
    for r in records:
        assert [t["turn"] for t in r["per_turn"]] == list(range(1, r["turns"] + 1))
        assert sum(t["tokens"] for t in r["per_turn"]) == r["model_tokens"]
        assert sum(t["tool_calls"] for t in r["per_turn"]) == r["tool_calls"]
        assert sum(m["role"] == "assistant" for m in r["messages"]) == r["turns"]


def test_eval_feedback_episodes_have_every_turn_in_the_transcript(one_token_turns_model, capsys):
    summary = eval_json(capsys, one_token_turns_model, "--env", FEEDBACK_ENV, "--max-turns", "3",
                        "--max-new-tokens", "6")
    assert summary["env"] == {"source": "python", "id": FEEDBACK_ENV, "args": {}}
    assert_summary_matches_records(summary)
    for r in summary["records"]:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
        assert r["messages"][0]["content"].startswith("What is ") and r["question"] in r["messages"][0]["content"]
        assert [m["content"] for m in r["messages"][2::2]] == [FEEDBACK, FEEDBACK]
        assert [t["tokens"] for t in r["per_turn"]] == [1, 1, 1]  # every character ends the turn
        assert r["finish_reason"] == "stop" and not r["truncated"] and not r["turn_limit"]
        assert r["reward"] == pytest.approx(0.3) and r["correct"] == 1.0  # the environment's score > 0: right
        assert r["env_tokens"] > 0 and FEEDBACK in r["transcript"] and r["transcript"].count("<|im_start|>user") == 2
    assert summary["turns_mean"] == 3.0 and summary["tool_call_rate"] == 0.0 and summary["accuracy"] == 1.0


def test_eval_calculator_episodes_show_tool_calls_and_results(tool_calling_model, capsys):
    argv = ["--env", "calculator", "--max-turns", "2", "--max-new-tokens", "24"]
    summary = eval_json(capsys, tool_calling_model, *argv)
    assert_summary_matches_records(summary)
    for r in summary["records"]:
        assert r["messages"][0]["role"] == "system" and "calculator" in r["messages"][0]["content"]
        assert [(m["role"], m["content"]) for m in r["messages"][2:]] == [
            ("assistant", CALL), ("tool", calculate("2*3")), ("assistant", CALL)]
        # the second call is not run: max_turns ended the episode while the model still wanted the tool
        assert r["per_turn"] == [{"turn": 1, "tokens": len(CALL), "tool_calls": 1},
                                 {"turn": 2, "tokens": len(CALL), "tool_calls": 0}]
        assert r["turn_limit"] and r["tool_errors"] == 0 and r["reward"] is None
        assert "<result>6</result>" in r["transcript"]
    assert summary["tool_call_rate"] == 1.0 and summary["tool_calls_mean"] == 1.0
    assert summary["tool_error_rate"] == 0.0 and summary["turn_limit_frac"] == 1.0
    assert main(["eval", tool_calling_model, "--n", "3", *argv]) == 0  # the text report
    out = capsys.readouterr().out
    assert "on 3 problems" in out and "tool-call rate 100.0%, mean turns 2.00, mean tool calls 1.00" in out


def test_generate_calculator_episodes_per_prompt(tool_calling_model, capsys):
    argv = ["generate", tool_calling_model, "--env", "calculator", "--prompt", "2*3", "--prompt", "hi",
            "--max-turns", "3", "--max-new-tokens", "24"]
    assert main([*argv, "--json"]) == 0
    lines = json_lines(capsys.readouterr().out)
    assert [(x["prompt_index"], x["completion_index"], x["question"]) for x in lines] == [(0, 0, "2*3"), (1, 0, "hi")]
    for line in lines:
        assert "You can use these tools" in line["prompt"] and line["prompt"].endswith("<|im_start|>assistant\n")
        assert [t["tool_calls"] for t in line["per_turn"]] == [1, 1, 0]
        assert [t["tokens"] for t in line["per_turn"]] == [len(CALL)] * 3 and line["model_tokens"] == 3 * len(CALL)
        assert [m["content"] for m in line["messages"] if m["role"] == "tool"] == ["6", "6"]
        assert line["tool_calls"] == 2 and line["turns"] == 3 and line["finish_reason"] == "stop"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "=== prompt 1/2: '2*3'" in out and "=== prompt 2/2: 'hi'" in out
    assert out.count("--- episode 1/1 (3 turns, 2 tool calls, 48 model tokens, stop, reward None)") == 2
    assert f"[assistant, turn 1: 16 tokens, 1 tool calls]\n{CALL}\n[tool]\n6\n" in out


def test_generate_sampled_feedback_episodes(one_token_turns_model, capsys):
    argv = ["generate", one_token_turns_model, "--env", FEEDBACK_ENV, "--prompt", "3 + 4", "--n", "2",
            "--temperature", "1.0", "--seed", "3", "--max-turns", "2", "--max-new-tokens", "4", "--json"]
    assert main(argv) == 0
    lines = json_lines(capsys.readouterr().out)
    assert [x["completion_index"] for x in lines] == [0, 1]
    for line in lines:
        assert [m["role"] for m in line["messages"]] == ["user", "assistant", "user", "assistant"]
        assert line["messages"][2]["content"] == FEEDBACK and line["reward"] == pytest.approx(0.2)
    assert main(argv) == 0  # seeded: the same episodes again
    assert json_lines(capsys.readouterr().out) == lines


@pytest.mark.parametrize("command, argv, message", [
    ("eval", ["--env", "chess"], "'chess' is not a built-in environment; choose one of ['calculator', 'retry']"),
    ("eval", ["--env", "calculator", "--env-args", "{max_tries: 2"], "--env-args is not valid JSON"),
    ("generate", ["--env", "retry", "--env-args", "[2]"], "--env-args must be a JSON object"),
    ("eval", ["--env", "retry", "--env-args", '{"tries": 2}'], "unexpected keyword argument 'tries'"),
    ("eval", ["--env", "no_such_module_xyz:Env"], "cannot import module 'no_such_module_xyz'"),
    ("eval", ["--env", "verifiers:"], "env.source=verifiers needs env.id"),
    ("generate", ["--env", "verifiers:gsm8k"], "a verifiers environment brings its own prompts"),
    ("eval", ["--max-turns", "3"], "--max-turns set the episodes of an environment: give --env NAME"),
    ("eval", ["--env", "calculator", "--max-turns", "0"], "env.max_turns=0 is out of range"),
    ("generate", ["--env", "calculator", "--max-turn-tokens", "600"], "exceeds env.max_episode_tokens=512"),
    ("eval", ["--env", "retry", "--effort", "0.5"], "--effort"),
])
def test_bad_env_options_are_clear_errors(tiny_model_dir, capsys, command, argv, message):
    prompt = ["--prompt", "hi"] if command == "generate" else []
    assert main([command, tiny_model_dir, *prompt, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reasonrl {command}: ") and message in err


def test_turn_tokens_are_the_runs_of_sampled_tokens():
    from reasonrl.envs.base import EpisodeState
    from reasonrl.envs.episodes import Episode
    from reasonrl.envs.trajectories import episode_turns

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ab"},
                {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}, {"role": "assistant", "content": "c"}]
    episode = Episode([0], EpisodeState(row={}, messages=messages, turns=2), ids=[5] * 6,
                      sampled=[True, True, False, False, False, True])
    assert episode_turns(episode) == [{"turn": 1, "tokens": 2, "tool_calls": 2}, {"turn": 2, "tokens": 1, "tool_calls": 0}]
    episode.state.turns = 3  # a turn without tokens leaves no run: which one is unknown
    episode.state.messages.append({"role": "assistant", "content": ""})
    assert [t["tokens"] for t in episode_turns(episode)] == [None, None, None]
