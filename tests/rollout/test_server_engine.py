"""`reasonrl serve` as a second process on loopback, driven by ServerEngine: generate, push weights over gloo,
generate again, refuse pushes from non-members, shut down; a dead server gives a clear error, not a hang.

Uses the tiny random model (fp32 on both sides) so the whole module takes about a minute on 2 CPU cores.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from reasonrl.rollout.base import SamplingParams
from reasonrl.rollout.server_engine import ServerClient, ServerEngine, ServerRequestError, ServerUnavailableError

LOGP_ATOL = 2e-4  # fp32 server vs fp32 transformers: different kernels and summation order
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65]]


@pytest.fixture(scope="module")
def server(vllm_module, vllm_tiny_model_dir, tmp_path_factory, free_port):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "reasonrl.cli", "serve", vllm_tiny_model_dir, "--port", str(port), "--dtype",
           "float32", "--", "--kv-cache-memory-bytes", str(1 << 28)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"reasonrl serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            ServerClient(url, 5).get("/health")
            break
        except ServerUnavailableError:
            time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"reasonrl serve did not become healthy in 300 s:\n{log.read_text()[-3000:]}")
    yield proc, url, log
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def hf_model(vllm_tiny_model_dir):
    from reasonrl.models import load_model

    return load_model(vllm_tiny_model_dir, dtype="float32").eval()


@pytest.fixture(scope="module")
def engine(server, hf_model):
    _, url, _ = server
    engine = ServerEngine(url, eos_token_ids=[hf_model.config.eos_token_id], timeout_s=120)
    yield engine
    engine.close()


def teacher_forced(model, prompt, completion):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def assert_scores_like(model, prompts, completions, logprobs):
    for prompt, completion, logp in zip(prompts, completions, logprobs):
        torch.testing.assert_close(torch.tensor(logp, dtype=torch.float64), teacher_forced(model, prompt, completion),
                                   atol=LOGP_ATOL, rtol=0)


def test_health_dtype_and_sampling(engine, hf_model):
    assert engine.health()["healthy"] is True
    assert engine.dtype == "float32" and engine.weight_dtype == torch.float32
    params = SamplingParams(n=3, temperature=1.0, seed=11)
    out = engine.generate(PROMPTS, params, [6, 0, 9])
    assert len(out.completion_ids) == 9
    assert [len(c) for c in out.completion_ids[3:6]] == [0, 0, 0]  # a zero budget gives empty completions
    assert all(0 < len(c) <= 6 for c in out.completion_ids[:3]) and all(0 < len(c) <= 9 for c in out.completion_ids[6:])
    assert out.completion_ids[:3] != [out.completion_ids[0]] * 3  # n distinct samples
    again = engine.generate(PROMPTS, params, [6, 0, 9])
    assert again.completion_ids == out.completion_ids  # seeded: reproducible
    # sampled at T=1: the returned log-probs are the model's own
    prompts = [PROMPTS[i // 3] for i in range(9) if out.completion_ids[i]]
    completions = [c for c in out.completion_ids if c]
    assert_scores_like(hf_model, prompts, completions, [lp for lp in out.logprobs if lp])
    greedy = engine.generate(PROMPTS, SamplingParams(n=2, temperature=0.0), [8] * 3)
    assert greedy.completion_ids[0] == greedy.completion_ids[1]


def test_stop_strings_end_completions_where_hf_would(engine, vllm_tiny_model_dir):
    from test_stops import assert_stops_respected

    from reasonrl.models import load_tokenizer

    tokenizer = load_tokenizer(vllm_tiny_model_dir)
    engine.tokenizer = tokenizer
    stops = ("a", "e", "7")
    out = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, seed=5, stop=stops), [30] * 3)
    assert_stops_respected(out, tokenizer, stops, 30)


def test_push_is_refused_before_any_client_joined(server, engine):
    _, url, _ = server
    intruder = ServerClient(url, 30)
    update = {"token": "guess", "names": ["model.norm.weight"], "dtype_names": ["float32"], "shapes": [[128]]}
    intruder.post("/start_weight_update")
    with pytest.raises(ServerRequestError, match="refused: no client has joined"):
        intruder.post("/update_weights", {"update_info": update})
    assert engine.health()["healthy"] is True


def test_push_changes_generation_and_scores(engine, hf_model, server):
    from reasonrl.batch import RolloutBatch
    from reasonrl.trainers.sync_check import check_weight_sync

    before = engine.generate(PROMPTS, SamplingParams(temperature=0.0), [10] * 3)
    version = engine.health()["weight_version"]
    torch.manual_seed(0)
    with torch.no_grad():  # a large "optimizer step" on the trainer's copy
        for p in hf_model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    t0 = time.perf_counter()
    engine.load_weights(hf_model.named_parameters())
    assert time.perf_counter() - t0 < 30
    assert engine.health()["weight_version"] != version
    after = engine.generate(PROMPTS, SamplingParams(temperature=0.0), [10] * 3)
    assert after.completion_ids != before.completion_ids
    assert_scores_like(hf_model, PROMPTS, after.completion_ids, after.logprobs)  # greedy: no temperature scaling
    probe = engine.prompt_logprobs(PROMPTS, after.completion_ids)
    assert_scores_like(hf_model, PROMPTS, after.completion_ids, probe)
    # the trainer's guard agrees
    width = max(len(c) for c in after.completion_ids)
    ids = torch.tensor([c + [0] * (width - len(c)) for c in after.completion_ids])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in after.completion_ids], dtype=torch.bool)
    batch = RolloutBatch(PROMPTS, ids, mask, None, ["stop"] * 3, group_size=3)
    assert check_weight_sync(engine, hf_model, batch, pad_id=0, tolerance=0.002, step=1)["sync/prob_gap_max"] < 1e-3
    # a member's push with the wrong token (someone who did not join) is refused, and the weights stay
    _, url, _ = server
    intruder = ServerClient(url, 30)
    intruder.post("/start_weight_update")
    with pytest.raises(ServerRequestError, match="not a member"):
        intruder.post("/update_weights", {"update_info": {"token": "guess", "names": [], "dtype_names": [],
                                                          "shapes": []}})
    assert engine.generate(PROMPTS, SamplingParams(temperature=0.0), [10] * 3).completion_ids == after.completion_ids
    engine.load_weights(hf_model.named_parameters())  # and the member can still push afterwards


def test_trainer_runs_against_the_server(server, vllm_tiny_model_dir, tmp_path, monkeypatch):
    """Two GRPO steps with rollout.engine=server: an initial push, one push and a parity check per step."""
    import json
    from pathlib import Path

    from reasonrl.trainers import grpo

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "trainers"))  # rewards_for_tests
    _, url, _ = server
    args = {
        "rewards": "[{name: 'rewards_for_tests:digit_count'}]",
        "model.name_or_path": vllm_tiny_model_dir, "data.num_train": 32, "data.num_eval": 4,
        "rollout.group_size": 4, "rollout.prompts_per_step": 2, "rollout.max_new_tokens": 6, "optim.lr": 1e-3,
        "trainer.steps": 2, "trainer.output_dir": str(tmp_path), "trainer.save_every": 0, "trainer.eval_every": 0,
        "trainer.eval_at_start": "false", "trainer.eval_max_new_tokens": 4, "logging.wandb_mode": "disabled",
        "rollout.engine": "server", "rollout.server_url": url,
    }
    assert grpo.main([f"{k}={v}" for k, v in args.items()]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "sync/prob_gap_mean" in r]
    assert len(steps) == 2
    assert all(r["sync/prob_gap_max"] < 1e-3 and r["time/weight_sync"] > 0 for r in steps)
    assert all("sampling/is_ratio_mean" in r for r in steps)  # IS correction is on by default for the server


def test_clean_shutdown_then_clear_error(server, engine):
    proc, url, _ = server
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    t0 = time.perf_counter()
    with pytest.raises(ServerUnavailableError, match=f"{url}.*did not answer"):
        engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0), [4])
    with pytest.raises(ServerUnavailableError):
        engine.health()
    assert time.perf_counter() - t0 < 10  # refused at once, no hang
