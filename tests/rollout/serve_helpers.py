"""`reasonrl serve` as a second process on loopback for tests (test_server_engine.py, test_server_failures.py), and the
fp32 teacher-forced scores a pushed server must reproduce."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reasonrl.rollout.server_auth import API_KEY_ENV, WEIGHT_TOKEN_ENV
from reasonrl.rollout.server_engine import ServerClient, ServerUnavailableError

LOGP_ATOL = 2e-4  # fp32 server vs fp32 transformers: different kernels and summation order
START_TIMEOUT_S = 300  # vLLM's start on 2 busy CPU cores takes about a minute


def start_server(model_dir: str, folder: Path, port: int, *, token: str, api_key: str | None = None,
                 vllm_args: tuple[str, ...] = ()):
    """``(process, url, log)`` of a healthy fp32 server that takes ``token`` as its weight token (from a file) and
    ``api_key`` (from the environment); ``vllm_args`` go to vLLM after the KV-cache size. Its own session, so
    `kill_server` reaches vLLM's engine process too."""
    log, token_file = folder / "server.log", folder / "weight-token"
    token_file.write_text(token + "\n")
    cmd = [sys.executable, "-m", "reasonrl.cli", "serve", model_dir, "--port", str(port), "--dtype", "float32",
           "--weight-token-file", str(token_file), "--", "--kv-cache-memory-bytes", str(1 << 28),
           *vllm_args]
    env = {k: v for k, v in os.environ.items() if k not in (WEIGHT_TOKEN_ENV, API_KEY_ENV)}
    if api_key:
        env[API_KEY_ENV] = api_key
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"reasonrl serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            ServerClient(url, 5).get("/health")
            return proc, url, log
        except ServerUnavailableError:
            time.sleep(2)
    kill_server(proc)
    pytest.fail(f"reasonrl serve did not become healthy in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def signal_server(proc: subprocess.Popen, sig: int) -> None:
    """``sig`` to the server and vLLM's engine process (its process group)."""
    os.killpg(proc.pid, sig)


def kill_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        signal_server(proc, signal.SIGKILL)
        proc.wait(timeout=60)


def teacher_forced(model, prompt, completion):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def assert_scores_like(model, prompts, completions, logprobs):
    for prompt, completion, logp in zip(prompts, completions, logprobs):
        torch.testing.assert_close(torch.tensor(logp, dtype=torch.float64), teacher_forced(model, prompt, completion),
                                   atol=LOGP_ATOL, rtol=0)
