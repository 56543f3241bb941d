"""`reasonrl serve`'s vLLM command line on CPU: the engine's CPU settings, and the user's options after `--` win."""

import argparse

import pytest
import torch

from reasonrl.rollout.vllm_engine import CPU_BLOCK_SIZE
from reasonrl.serve import ROUTE_GUARD, vllm_server_argv


def args(*passthrough):
    return argparse.Namespace(model="tiny-random-llama", host="127.0.0.1", port=8000, dtype=None, seed=0,
                              max_model_len=None, gpu_memory_utilization=None, passthrough=list(passthrough))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_cpu_server_uses_small_kv_blocks_so_group_samples_share_the_prompt():
    argv = vllm_server_argv(args())
    assert argv[argv.index("--block-size") + 1] == str(CPU_BLOCK_SIZE)
    assert argv[argv.index("--dtype") + 1] == "float32" and "--no-enable-chunked-prefill" in argv


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU defaults")
def test_a_block_size_after_the_separator_replaces_the_default():
    argv = vllm_server_argv(args("--block-size", "64"))
    assert argv.count("--block-size") == 1 and argv[-2:] == ["--block-size", "64"]


def test_the_server_runs_behind_the_route_guard_and_takes_its_api_key_from_reasonrl():
    argv = vllm_server_argv(args())
    assert argv[argv.index("--middleware") + 1] == ROUTE_GUARD
    assert argv[argv.index("--logprobs-mode") + 1] == "processed_logprobs"  # the engines' one definition (base.py)
    with pytest.raises(ValueError, match="reasonrl serve --api-key"):  # vLLM's own would leave the RL routes open
        vllm_server_argv(args("--api-key", "k"))
