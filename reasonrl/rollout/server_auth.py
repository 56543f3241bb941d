"""Who may change a `reasonrl serve` server's weights, and who may call it at all.

Two secrets, both given when the server starts and never chosen by a caller:

- **The weight token** (`reasonrl serve --weight-token-file FILE`, or ``REASONRL_WEIGHT_TOKEN`` /
  ``REASONRL_WEIGHT_TOKEN_FILE`` in its environment). A trainer must present it to open the weight group
  (``/init_weight_transfer_engine``), to push (``/update_weights``) and on every other route that changes the weights
  or the group. The worker (`gloo_transfer`) checks it in the request bodies; `RouteGuard` checks it in the
  ``X-Reasonrl-Weight-Token`` header, which also covers the routes whose vLLM handlers take no body (closing the group,
  starting or finishing an update) and ``/collective_rpc`` (it runs any worker method). A server started without a
  token refuses every weight push: it serves the weights it loaded.
- **The API key** (`reasonrl serve --api-key`, or ``REASONRL_API_KEY``; handed to vLLM as ``VLLM_API_KEY``). vLLM's own
  check covers the ``/v1`` routes only; `RouteGuard` asks for it (``Authorization: Bearer KEY``) on every route but
  ``/health``, so the RL and dev routes vLLM adds are covered too.

Secrets are compared in constant time (`hmac.compare_digest`). The trainer side reads the same environment variables
(`client_secrets`). Neither secret is encrypted on the wire (plain HTTP): use them on a private network, or put a
TLS proxy in front.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

WEIGHT_TOKEN_ENV = "REASONRL_WEIGHT_TOKEN"
WEIGHT_TOKEN_FILE_ENV = "REASONRL_WEIGHT_TOKEN_FILE"
API_KEY_ENV = "REASONRL_API_KEY"
VLLM_API_KEY_ENV = "VLLM_API_KEY"  # what vLLM's server reads its --api-key from
WEIGHT_TOKEN_HEADER = "x-reasonrl-weight-token"
MIN_TOKEN_CHARS = 16

OPEN_ROUTES = frozenset({"/health"})  # liveness probes need no key
# Routes of vLLM 0.32's RL router (VLLM_SERVER_DEV_MODE) that change the weights or the weight group, and the dev
# router's /collective_rpc, which calls any worker method (init_weight_transfer_engine and reload_weights included).
WEIGHT_ROUTES = frozenset({
    "/init_weight_transfer_engine", "/shutdown_weight_transfer_engine", "/start_weight_update",
    "/start_draft_weight_update", "/update_weights", "/finish_weight_update", "/update_weight_version",
    "/collective_rpc",
})


def token_matches(given: object, secret: str | None) -> bool:
    """Constant-time comparison; no secret configured matches nothing."""
    if not secret or not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode(), secret.encode())


def read_secret_file(path: str | os.PathLike) -> str:
    """The secret in ``path`` (surrounding whitespace and the final newline removed)."""
    secret = Path(path).read_text(encoding="utf-8").strip()
    if not secret:
        raise ValueError(f"{path} is empty: put the secret in it")
    return secret


def weight_token_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """``REASONRL_WEIGHT_TOKEN``, else the contents of the file ``REASONRL_WEIGHT_TOKEN_FILE`` names, else None."""
    if environ.get(WEIGHT_TOKEN_ENV):
        return environ[WEIGHT_TOKEN_ENV]
    path = environ.get(WEIGHT_TOKEN_FILE_ENV)
    return read_secret_file(path) if path else None


def check_weight_token(token: str) -> str:
    """A token a server may start with: long enough not to be guessed by trying."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the weight token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}, e.g. "
                         "python -c 'import secrets; print(secrets.token_hex(32))' > token && chmod 600 token")
    return token


def client_secrets(environ: Mapping[str, str] = os.environ) -> dict[str, str | None]:
    """The trainer side's ``{"token": ..., "api_key": ...}`` for `ServerEngine`, from the environment."""
    return {"token": weight_token_from_env(environ), "api_key": environ.get(API_KEY_ENV) or None}


def bearer(headers: Mapping[str, str]) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header."""
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return key if scheme.lower() == "bearer" else None


def refusal(path: str, headers: Mapping[str, str], *, api_key: str | None, weight_token: str | None):
    """(HTTP status, message) for a request the server must refuse, or None to let it through. Pure, so it is tested
    without a server; `RouteGuard` applies it."""
    if api_key and path not in OPEN_ROUTES and not token_matches(bearer(headers), api_key):
        return 401, "Unauthorized: this server needs its API key (Authorization: Bearer KEY)"
    if path in WEIGHT_ROUTES:
        if not weight_token:
            return 403, ("weight route refused: this server was started without a weight token "
                         "(reasonrl serve --weight-token-file FILE), so it takes no weight pushes")
        if not token_matches(headers.get(WEIGHT_TOKEN_HEADER), weight_token):
            return 403, "weight route refused: missing or wrong weight token (X-Reasonrl-Weight-Token header)"
    return None


class RouteGuard:
    """ASGI middleware (`reasonrl serve` adds it with vLLM's ``--middleware``) applying `refusal` to every HTTP
    request. The secrets come from the server's environment, set by `reasonrl serve`."""

    def __init__(self, app):
        self.app = app
        self.api_key = os.environ.get(VLLM_API_KEY_ENV) or None
        self.weight_token = weight_token_from_env()

    def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return self.app(scope, receive, send)
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse

        path = scope["path"].removeprefix(scope.get("root_path", ""))
        refused = refusal(path, Headers(scope=scope), api_key=self.api_key, weight_token=self.weight_token)
        if refused is None:
            return self.app(scope, receive, send)
        status, message = refused
        return JSONResponse({"error": message}, status_code=status)(scope, receive, send)
