"""`reasonrl serve` as a second process on loopback, driven by ServerEngine: generate (log-probs and entropies as every
engine defines them), push weights over gloo, generate again; refuse callers without the API key, weight pushes and
groups without the weight token, and a second group while one is active; shut down; a dead server gives a clear
error, not a hang.

Uses the tiny random model (fp32 on both sides) so the whole module takes about a minute on 2 CPU cores.
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
import torch
from engine_reference import CASES, assert_matches_reference, trainer_entropies
from serve_helpers import assert_scores_like, kill_server, start_server

from reasonrl.cli import main
from reasonrl.rollout.base import SamplingParams
from reasonrl.rollout.server_auth import API_KEY_ENV, WEIGHT_TOKEN_ENV, WEIGHT_TOKEN_HEADER
from reasonrl.rollout.server_engine import ServerClient, ServerEngine, ServerRequestError, ServerUnavailableError

PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51], [1, 60, 61, 62, 63, 64, 65]]
TOKEN = secrets.token_hex(16)  # the server's weight token, given at start in a file
API_KEY = secrets.token_hex(8)  # its API key, given in the environment (REASONRL_API_KEY)
NORM = {"names": ["model.norm.weight"], "dtype_names": ["float32"], "shapes": [[128]]}  # a one-tensor push


@pytest.fixture(scope="module")
def server(vllm_module, vllm_tiny_model_dir, tmp_path_factory, free_port):
    proc, url, log = start_server(vllm_tiny_model_dir, tmp_path_factory.mktemp("server"), free_port(), token=TOKEN,
                                  api_key=API_KEY)
    yield proc, url, log
    kill_server(proc)


@pytest.fixture(scope="module")
def hf_model(vllm_tiny_model_dir):
    from reasonrl.models import load_model

    return load_model(vllm_tiny_model_dir, dtype="float32").eval()


@pytest.fixture(scope="module")
def engine(server, hf_model):
    _, url, _ = server
    engine = ServerEngine(url, eos_token_ids=[hf_model.config.eos_token_id], timeout_s=120, token=TOKEN,
                          api_key=API_KEY)
    yield engine
    engine.close()


def client(url, *, api_key=API_KEY) -> ServerClient:
    return ServerClient(url, 30, api_key=api_key)


def weight_call(url, path, payload=None, *, token):
    headers = {} if token is None else {WEIGHT_TOKEN_HEADER: token}
    return client(url).post(path, payload, headers=headers)


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


@pytest.mark.parametrize("case", CASES)
def test_server_engine_returns_the_defined_logprobs(engine, hf_model, case):
    """The server's rollout log-probs are those of the distribution each token was drawn from, and the trainer's
    entropies are at T = 1: the same values as the hf and vllm engines (test_engine_semantics.py)."""
    params = CASES[case]
    out = engine.generate(PROMPTS, params, [8, 5, 8])
    assert_matches_reference(hf_model, PROMPTS, out, params, trainer_entropies(hf_model, PROMPTS, out, params,
                                                                                pad_id=0))


def test_stop_strings_end_completions_where_hf_would(engine, vllm_tiny_model_dir):
    from test_stops import assert_stops_respected

    from reasonrl.models import load_tokenizer

    tokenizer = load_tokenizer(vllm_tiny_model_dir)
    engine.tokenizer = tokenizer
    stops = ("a", "e", "7")
    out = engine.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, seed=5, stop=stops), [30] * 3)
    assert_stops_respected(out, tokenizer, stops, 30)


def test_eval_cli_on_the_server_engine_matches_hf(server, vllm_tiny_model_dir, capsys, monkeypatch):
    """`reasonrl eval --engine server`: the engine from the typed RolloutConfig, the API key from the environment;
    greedy on the same weights, so the summary of the hf engine."""
    _, url, _ = server
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    argv = ["eval", vllm_tiny_model_dir, "--n", "4", "--max-new-tokens", "6", "--json"]
    summaries = {}
    for engine in ("server", "hf"):
        assert main([*argv, "--engine", engine, "--server-url", url]) == 0
        summaries[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    got = summaries["server"]
    assert got["engine"] == "server" and got["n"] == 4 and 0.0 <= got["accuracy"] <= 1.0
    assert 0.0 < got["mean_length"] <= 6
    assert (got["accuracy"], got["mean_length"]) == (summaries["hf"]["accuracy"], summaries["hf"]["mean_length"])


def test_generate_cli_on_the_server_engine(server, vllm_tiny_model_dir, capsys, monkeypatch):
    _, url, _ = server
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    assert main(["generate", vllm_tiny_model_dir, "--prompt", "3 + 4", "--n", "2", "--temperature", "1.0", "--seed",
                 "5", "--max-new-tokens", "6", "--json", "--engine", "server", "--server-url", url]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(x["prompt_index"], x["completion_index"]) for x in lines] == [(0, 0), (0, 1)]
    assert all(0 < x["tokens"] <= 6 for x in lines) and lines[0]["completion"] != lines[1]["completion"]


def test_routes_need_the_api_key_but_health(server):
    _, url, _ = server
    for path in ("/v1/models", "/server_info", "/weight_info"):  # vLLM's own check covers /v1 only
        for key in (None, "wrong"):
            with pytest.raises(ServerRequestError) as refused:
                client(url, api_key=key).get(path)
            assert refused.value.status == 401, path
    with pytest.raises(ServerRequestError, match="HTTP 401"):
        client(url, api_key=None).post("/v1/completions", {"model": "x", "prompt": [1, 2], "max_tokens": 1})
    client(url, api_key=None).get("/health")
    assert client(url).get("/v1/models")["data"]
    with pytest.raises(ServerRequestError, match="HTTP 401"):  # the engine sends the key: without it, a clear error
        ServerEngine(url, eos_token_ids=[2], token=TOKEN)


@pytest.mark.parametrize("token", [None, "wrong-" + "0" * 26])
def test_weight_routes_refuse_a_caller_without_the_token(server, engine, token):
    _, url, _ = server
    init = {"init_info": {"master_address": "127.0.0.1", "master_port": 1, "token": TOKEN, "group_id": "x"}}
    calls = [("/init_weight_transfer_engine", init), ("/start_weight_update", None),
             ("/update_weights", {"update_info": {"token": TOKEN, **NORM}}), ("/finish_weight_update", None),
             ("/shutdown_weight_transfer_engine", None), ("/collective_rpc", {"method": "reload_weights"})]
    for path, payload in calls:
        with pytest.raises(ServerRequestError, match="weight route refused: missing or wrong weight token") as err:
            weight_call(url, path, payload, token=token)
        assert err.value.status == 403, path
    intruder = ServerEngine(url, eos_token_ids=[2], token=token, api_key=API_KEY, group_timeout_s=60)
    version = engine.health()["weight_version"]
    t0 = time.perf_counter()
    with pytest.raises(PermissionError if token is None else ServerRequestError, match="weight token"):
        intruder.load_weights([("model.norm.weight", torch.zeros(128))])
    assert time.perf_counter() - t0 < 10  # refused at once, not after the group's timeout
    assert engine.health()["weight_version"] == version  # nothing was pushed


def test_push_is_refused_before_any_client_joined(server, engine):
    """The worker's own check, behind the route guard: a token holder's push with no group open."""
    _, url, _ = server
    weight_call(url, "/start_weight_update", token=TOKEN)
    with pytest.raises(ServerRequestError, match="refused: no client has joined"):
        weight_call(url, "/update_weights", {"update_info": {"token": TOKEN, **NORM}}, token=TOKEN)
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
    # a push whose body carries a wrong token is refused by the worker too, and the weights stay
    _, url, _ = server
    weight_call(url, "/start_weight_update", token=TOKEN)
    with pytest.raises(ServerRequestError, match="weight push refused: wrong weight token"):
        weight_call(url, "/update_weights", {"update_info": {"token": "guess", **NORM}}, token=TOKEN)
    assert engine.generate(PROMPTS, SamplingParams(temperature=0.0), [10] * 3).completion_ids == after.completion_ids
    engine.load_weights(hf_model.named_parameters())  # and the member can still push afterwards


def test_a_second_group_is_refused_while_one_is_active(server, engine, hf_model):
    """One trainer at a time: a second token holder cannot take the weight group over until the first closes it."""
    _, url, _ = server
    engine.load_weights(hf_model.named_parameters())  # the first trainer's group is open
    second = ServerEngine(url, eos_token_ids=[2], token=TOKEN, api_key=API_KEY, group_timeout_s=60)
    with pytest.raises(ServerRequestError, match="another trainer's weight group is active"):
        second.load_weights(hf_model.named_parameters())
    version = engine.health()["weight_version"]
    engine.load_weights(hf_model.named_parameters())  # the first one keeps pushing
    assert engine.health()["weight_version"] != version
    engine.close()  # it closes its group: now the second may open one
    second.load_weights(hf_model.named_parameters())
    second.close()


def test_the_group_of_a_killed_trainer_is_replaced(server, engine):
    """A trainer killed without closing its group does not lock the server: its store is gone, so the next one joins."""
    _, url, _ = server
    code = ("import sys, time; from reasonrl.rollout.server_engine import ServerEngine; "
            "e = ServerEngine(sys.argv[1], eos_token_ids=[2], token=sys.argv[2], api_key=sys.argv[3]); e.join(); "
            "print('joined', flush=True); time.sleep(600)")
    trainer = subprocess.Popen([sys.executable, "-c", code, url, TOKEN, API_KEY], stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "joined"
    finally:
        trainer.kill()
        trainer.wait()
    engine.join()  # refused if the dead trainer's group still counted as active
    engine.close()


def test_trainer_runs_against_the_server(server, vllm_tiny_model_dir, tmp_path, monkeypatch):
    """Two GRPO steps with rollout.engine=server: an initial push, one push and a parity check per step; the trainer
    takes the server's secrets from the environment."""
    from pathlib import Path

    from reasonrl.trainers import grpo

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "trainers"))  # rewards_for_tests
    monkeypatch.setenv(WEIGHT_TOKEN_ENV, TOKEN)
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
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
