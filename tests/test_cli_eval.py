"""`reasonrl eval` of a run folder on the tiny model with each in-process engine: the engines are built from the typed
RolloutConfig (the vllm path once crashed on a hand-built Namespace), and both give the same greedy summary. The
server engine's run of the same command is in tests/rollout/test_server_engine.py (it needs that module's server)."""

import json
import shutil

import pytest

from reasonrl.cli import main
from reasonrl.trainers.checkpoint import STATE_FILE

N, MAX_NEW_TOKENS = 5, 6


@pytest.fixture(scope="module")
def run_dir(vllm_tiny_model_dir, tmp_path_factory):
    """A run folder as the trainer leaves it: checkpoints/step-000002/ with the model and the trainer state."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    checkpoint = run / "checkpoints" / "step-000002"
    shutil.copytree(vllm_tiny_model_dir, checkpoint / "model")
    (checkpoint / STATE_FILE).write_text("{}")
    return run


def eval_summary(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--n", str(N), "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def assert_sensible(summary: dict, engine: str, model: str) -> None:
    assert summary["engine"] == engine and summary["model"] == model
    assert summary["n"] == N and summary["max_new_tokens"] == MAX_NEW_TOKENS
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert 0.0 < summary["mean_length"] <= MAX_NEW_TOKENS  # the random model writes something, within the budget
    assert summary["seconds"] >= 0


def test_eval_of_a_run_gives_the_same_summary_on_hf_and_vllm(run_dir, vllm_module, capsys, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: vLLM's CPU default would take 0.3 of the RAM
    model = str(run_dir / "checkpoints" / "step-000002" / "model")  # the run's latest checkpoint
    hf = eval_summary(capsys, str(run_dir), "--engine", "hf")
    vllm = eval_summary(capsys, str(run_dir), "--engine", "vllm")
    assert_sensible(hf, "hf", model)
    assert_sensible(vllm, "vllm", model)
    # greedy decoding of the same weights: the same completions, so the same accuracy and lengths
    assert (vllm["accuracy"], vllm["mean_length"]) == (hf["accuracy"], hf["mean_length"])


def test_eval_of_a_lora_checkpoint_with_vllm_is_a_clear_error(tmp_path, capsys):
    from reasonrl.tiny_model import build_tiny_tokenizer

    adapter = tmp_path / "checkpoint" / "adapter"  # a LoRA run's checkpoint: the adapter and the tokenizer
    build_tiny_tokenizer().save_pretrained(adapter)
    (adapter / "adapter_config.json").write_text("{}")
    assert main(["eval", str(adapter.parent), "--engine", "vllm", "--n", "1"]) == 2
    assert "a LoRA checkpoint runs with --engine hf" in capsys.readouterr().err
