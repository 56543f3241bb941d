"""The server's secrets without a server: the route guard's decisions, where `reasonrl serve` takes its secrets from,
and the gloo worker's own checks (refuse a push or a group without the token, and a second group while one is
active). test_server_engine.py checks the same on a running server."""

import argparse

import pytest

from reasonrl.rollout import server_auth
from reasonrl.rollout.server_auth import WEIGHT_TOKEN_HEADER, client_secrets, refusal, token_matches
from reasonrl.serve import server_secrets

TOKEN = "t" * 32
KEY = "k" * 12


def decide(path, headers=None, *, api_key=KEY, weight_token=TOKEN):
    return refusal(path, headers or {}, api_key=api_key, weight_token=weight_token)


def test_every_route_but_health_needs_the_api_key():
    for path in ("/v1/completions", "/server_info", "/weight_info", "/reset_prefix_cache", "/update_weights"):
        assert decide(path)[0] == 401
        assert decide(path, {"authorization": "Bearer wrong"})[0] == 401
        assert decide(path, {"authorization": KEY})[0] == 401  # not a bearer header
    assert decide("/v1/completions", {"authorization": f"Bearer {KEY}"}) is None
    assert decide("/health") is None
    assert decide("/v1/models", api_key=None) is None  # no key configured: open


def test_weight_routes_need_the_weight_token():
    ok = {"authorization": f"Bearer {KEY}"}
    for path in server_auth.WEIGHT_ROUTES:
        assert decide(path, ok)[0] == 403
        assert decide(path, {**ok, WEIGHT_TOKEN_HEADER: TOKEN[:-1]})[0] == 403
        assert decide(path, {**ok, WEIGHT_TOKEN_HEADER: TOKEN}) is None
        status, message = decide(path, {**ok, WEIGHT_TOKEN_HEADER: TOKEN}, weight_token=None)
        assert status == 403 and "started without a weight token" in message
    assert decide("/v1/completions", ok) is None  # generation needs no weight token


def test_token_matches_only_the_secret():
    assert token_matches(TOKEN, TOKEN)
    assert not token_matches(TOKEN + "x", TOKEN) and not token_matches("", TOKEN)
    assert not token_matches(None, TOKEN) and not token_matches(["x"], TOKEN)
    assert not token_matches("", None) and not token_matches("", "")  # no secret: nothing matches
    assert not token_matches("é" * 32, TOKEN)  # non-ASCII is compared as bytes, not an error


def serve_args(**kw):
    return argparse.Namespace(**{"weight_token_file": None, "api_key": None, **kw})


def test_serve_takes_its_secrets_from_a_file_or_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert server_secrets(serve_args(weight_token_file=str(path)), {}) == {"REASONRL_WEIGHT_TOKEN": TOKEN}
    assert server_secrets(serve_args(), {"REASONRL_WEIGHT_TOKEN_FILE": str(path)}) == {"REASONRL_WEIGHT_TOKEN": TOKEN}
    assert server_secrets(serve_args(api_key=KEY), {}) == {"VLLM_API_KEY": KEY}  # vLLM reads it there too
    assert server_secrets(serve_args(), {"REASONRL_API_KEY": KEY}) == {"VLLM_API_KEY": KEY}
    assert server_secrets(serve_args(), {}) == {}  # no token: the server refuses every push
    with pytest.raises(ValueError, match="at least 16"):
        server_secrets(serve_args(), {"REASONRL_WEIGHT_TOKEN": "short"})
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        server_secrets(serve_args(weight_token_file=str(path)), {})


def test_the_trainer_reads_the_same_variables(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN)
    assert client_secrets({"REASONRL_WEIGHT_TOKEN_FILE": str(path), "REASONRL_API_KEY": KEY}) == {
        "token": TOKEN, "api_key": KEY}
    assert client_secrets({}) == {"token": None, "api_key": None}


# ---------------------------------------------------------------- the worker's checks (gloo_transfer)


class FakeStore:
    def __init__(self, alive: bool):
        self.alive = alive

    def set_timeout(self, timeout):
        pass

    def check(self, keys):
        if not self.alive:
            raise RuntimeError("Failed to recv, got 0 bytes. Connection was likely closed.")  # as DistNetworkError
        return False


@pytest.fixture
def worker(vllm_module, monkeypatch):
    """A GlooWeightTransferEngine without vLLM around it: the store and the group are fakes."""
    from reasonrl.rollout import gloo_transfer

    joined = []
    monkeypatch.setattr(gloo_transfer, "rendezvous_store", lambda *a, **kw: FakeStore(alive=True))
    monkeypatch.setattr(gloo_transfer, "join_group", lambda store, **kw: joined.append(kw["group_id"]) or object())
    engine = object.__new__(gloo_transfer.GlooWeightTransferEngine)
    engine.secret, engine.group, engine.store, engine.reloading = TOKEN, None, None, False
    engine.joined = joined
    return engine


def init_info(token, group_id="g1"):
    from reasonrl.rollout.gloo_transfer import GlooInitInfo

    return GlooInitInfo(master_address="127.0.0.1", master_port=1, token=token, group_id=group_id)


def update_info(token):
    from reasonrl.rollout.gloo_transfer import GlooUpdateInfo

    return GlooUpdateInfo(token=token, names=[], dtype_names=[], shapes=[])


def test_worker_refuses_a_group_or_a_push_without_its_token(worker):
    with pytest.raises(PermissionError, match="weight push refused: wrong weight token"):
        worker.receive_weights(update_info("guess"))
    with pytest.raises(PermissionError, match="no client has joined"):
        worker.receive_weights(update_info(TOKEN))
    with pytest.raises(PermissionError, match="weight group refused: wrong weight token"):
        worker.init_transfer_engine(init_info("guess"))
    assert worker.group is None and worker.joined == []
    worker.init_transfer_engine(init_info(TOKEN))
    assert worker.joined == ["g1"]
    worker.secret = None  # a server started without a token
    with pytest.raises(PermissionError, match="started without a weight token"):
        worker.receive_weights(update_info(TOKEN))


def test_worker_refuses_a_second_group_while_the_first_trainer_is_alive(worker):
    worker.init_transfer_engine(init_info(TOKEN, "first"))
    first = worker.group
    with pytest.raises(PermissionError, match="another trainer's weight group is active"):
        worker.init_transfer_engine(init_info(TOKEN, "second"))
    assert worker.group is first
    worker.shutdown()  # the first trainer closes its group
    worker.init_transfer_engine(init_info(TOKEN, "second"))
    worker.store.alive = False  # the second trainer was killed: its store is gone
    worker.init_transfer_engine(init_info(TOKEN, "third"))
    assert worker.joined == ["first", "second", "third"]
