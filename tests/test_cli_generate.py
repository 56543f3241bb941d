"""`reasonrl generate` and `reasonrl eval --effort` on the tiny model (in-process, transformers engine)."""

import json

import pytest

from reasonrl.cli import main
from reasonrl.data.effort import effort_line
from reasonrl.rollout.base import RolloutOutput
from reasonrl.rollout.cyclic_reflex import triangular_wave


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_generate_with_effort_prints_completions_and_the_prompt(tiny_model_dir, capsys):
    argv = ["generate", tiny_model_dir, "--prompt", "3 + 4", "--prompt", "12 * 3", "--effort", "0.3", "--n", "2",
            "--temperature", "1.0", "--seed", "5", "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    lines = _json_lines(capsys.readouterr().out)
    assert [(x["prompt_index"], x["completion_index"]) for x in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for line in lines:
        question = ["3 + 4", "12 * 3"][line["prompt_index"]]
        assert line["question"] == question and line["effort"] == 0.3
        # the effort line follows the question inside the default (arithmetic) template, in the chat format
        assert f"What is {question}\n{effort_line(0.3)}? Put the final answer" in line["prompt"]
        assert line["prompt"].startswith("<|im_start|>user\n")
        # the random tiny model never samples its end token within 6 tokens; one character per token
        assert line["tokens"] == len(line["completion"]) == 6 and line["finish_reason"] == "length"
    assert lines[0]["completion"] != lines[1]["completion"]  # n=2 gives two different samples of one prompt
    assert main(argv) == 0  # seeded: the same completions again
    assert _json_lines(capsys.readouterr().out) == lines


def test_generate_plain_text_from_a_prompts_file_without_effort(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "Say hi"}\n\n{"question": "2 + 2", "answer": "4"}\n')
    assert main(["generate", tiny_model_dir, "--prompts-file", str(prompts), "--template", "{question}",
                 "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "=== prompt 1/2: 'Say hi'" in out and "=== prompt 2/2: '2 + 2'" in out
    assert out.count("--- completion 1/1 (") == 2 and "tokens, " in out
    assert main(["generate", tiny_model_dir, "--prompts-file", str(prompts), "--template", "{question}",
                 "--max-new-tokens", "5", "--json"]) == 0
    lines = _json_lines(capsys.readouterr().out)
    assert lines[0]["prompt"] == "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n"
    assert "Effort" not in lines[1]["prompt"] and lines[1]["effort"] is None


def assert_wave_forces_the_reflection_token(lines, period):
    """With a huge amplitude the reflection token "w" wins exactly where the wave is positive, never where it is
    negative, also in the second (shorter) prompt: positions count generated tokens of each prompt."""
    assert len(lines) == 2
    for line in lines:
        text = line["completion"]  # character-level tokenizer: character p is generated token p
        assert len(text) == line["tokens"] == 12
        for p, char in enumerate(text):
            delta = triangular_wave(p, amplitude=1e4, period=period)
            if delta > 0:
                assert char == "w", (p, text)
            elif delta < 0:
                assert char != "w", (p, text)


def reflex_argv(model_dir, period, *engine):
    return ["generate", model_dir, "--prompt", "What is 37 + 45?", "--prompt", "Hi", "--template", "{question}",
            "--max-new-tokens", "12", "--cyclic-reflex", "--reflex-word", "w", "--reflex-amplitude", "1e4",
            "--reflex-period", str(period), "--json", *engine]


def test_generate_cyclic_reflex_on_the_hf_engine(tiny_model_dir, capsys):
    assert main(reflex_argv(tiny_model_dir, 8)) == 0
    assert_wave_forces_the_reflection_token(_json_lines(capsys.readouterr().out), 8)


def test_generate_cyclic_reflex_on_the_vllm_engine(vllm_module, vllm_tiny_model_dir, capsys, monkeypatch):
    """The vllm engine comes from the same factory as the trainer's, the CyclicReflex settings given at start-up."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: vLLM's CPU default would take 0.3 of the RAM
    assert main(reflex_argv(vllm_tiny_model_dir, 8, "--engine", "vllm")) == 0
    assert_wave_forces_the_reflection_token(_json_lines(capsys.readouterr().out), 8)


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "4"], "nothing to generate"),
    (["--prompt", "x", "--template", "no placeholder"], "{question}"),
    (["--prompt", "x", "--n", "2"], "greedy"),
    (["--prompt", "x", "--cyclic-reflex"], "single token"),  # the tiny vocabulary has no "wait", "But", ...
])
def test_generate_errors_exit_2(tiny_model_dir, capsys, argv, message):
    assert main(["generate", tiny_model_dir, *argv]) == 2
    assert message in capsys.readouterr().err


def test_effort_out_of_range_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "tiny-random-llama", "--prompt", "x", "--effort", "1.5"])
    assert exit_info.value.code == 2
    assert "effort must be in (0, 1]" in capsys.readouterr().err


def test_eval_with_effort_runs(tiny_model_dir, capsys):
    assert main(["eval", tiny_model_dir, "--n", "4", "--max-new-tokens", "4", "--effort", "0.5", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 4 and summary["effort"] == 0.5
    assert main(["eval", tiny_model_dir, "--n", "4", "--max-new-tokens", "4", "--json"]) == 0
    assert "effort" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_greedy_accuracy_puts_the_effort_line_in_the_prompts():
    from reasonrl.tiny_model import build_tiny_tokenizer
    from reasonrl.trainers.evaluate import greedy_accuracy

    tokenizer = build_tiny_tokenizer()

    class Recorder:
        def generate(self, prompt_ids, params, max_new_tokens, logits_processors=None):
            self.prompts = [tokenizer.decode(ids) for ids in prompt_ids]
            return RolloutOutput([[] for _ in prompt_ids], [[] for _ in prompt_ids], ["length"] * len(prompt_ids))

    rows = [{"question": "1 + 1", "answer": "2"}]
    engine = Recorder()
    greedy_accuracy(engine, tokenizer, rows, template="Q: {question}", max_new_tokens=3)
    assert engine.prompts == ["<|im_start|>user\nQ: 1 + 1<|im_end|>\n<|im_start|>assistant\n"]  # unchanged default
    greedy_accuracy(engine, tokenizer, rows, template="Q: {question}", max_new_tokens=3, effort=0.25)
    assert engine.prompts == ["<|im_start|>user\nQ: 1 + 1\nEffort: 0.25<|im_end|>\n<|im_start|>assistant\n"]
