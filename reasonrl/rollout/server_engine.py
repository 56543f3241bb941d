"""`rollout.engine=server`: generation by a separate vLLM server (`reasonrl serve`), weights pushed over gloo.

Generation goes through vLLM's OpenAI ``/v1/completions`` route with token ids in and out (``return_token_ids``),
one request per prompt with ``n`` samples, sent concurrently so the server batches them. Weight pushes use vLLM's RL
routes with the ``gloo`` backend (``gloo_transfer``): this process hosts the rendezvous store, the server joins, and
each push broadcasts bucketed bytes. Pushes need the server's weight token and, if it has one, every call its API key
(``server_auth``; `build_engine` reads both from the environment). Every HTTP call has a timeout and a dead server
raises ``ServerUnavailableError`` naming the URL, never hangs.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from reasonrl.rollout.adaptive_temperature import request_extra_args
from reasonrl.rollout.base import RolloutOutput, SamplingParams
from reasonrl.rollout.server_auth import API_KEY_ENV, WEIGHT_TOKEN_ENV, WEIGHT_TOKEN_FILE_ENV, WEIGHT_TOKEN_HEADER
from reasonrl.rollout.stops import cut_at_stop_strings, text_decoder
from reasonrl.rollout.weight_buckets import DEFAULT_BUCKET_BYTES, pack_bucket, plan_buckets, tensor_meta
from reasonrl.rollout.weight_group import broadcast_from_trainer, join_group, rendezvous_store

TRAINER_RANK = 0


class ServerUnavailableError(RuntimeError):
    """The vLLM server did not answer (not started, killed, or unreachable)."""


class ServerRequestError(RuntimeError):
    """The server answered with an error status."""

    def __init__(self, path: str, status: int, body: str):
        super().__init__(f"vLLM server {path} answered HTTP {status}: {body[:800]}")
        self.status = status
        self.body = body


class ServerClient:
    """Minimal JSON-over-HTTP client (stdlib only) with a timeout on every call; sends the API key if given."""

    def __init__(self, base_url: str, timeout_s: float, *, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def request(self, method: str, path: str, payload: dict | None = None, *, timeout_s: float | None = None,
                headers: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={**self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as err:
            raise ServerRequestError(path, err.code, err.read().decode(errors="replace")) from err
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise ServerUnavailableError(
                f"vLLM server at {self.base_url} did not answer {method} {path} ({reason}); is `reasonrl serve` "
                "running and reachable?"
            ) from err
        return json.loads(body) if body else {}

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, payload: dict | None = None, **kw):
        return self.request("POST", path, payload or {}, **kw)


def local_address_towards(host: str) -> str:
    """The address of this machine that ``host`` can reach us at (loopback for a local server)."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))  # no packet is sent; this only picks the outgoing interface
        return probe.getsockname()[0]


def _beside(background, foreground, *, timeout_s: float):
    """``background()``'s result, run in a thread while ``foreground()`` runs here. Joining the weight group blocks
    until the server joins too, and the server answers the HTTP call once it has, or at once when it refuses (wrong
    token, a group already active): a refusal is raised at once, leaving the join to time out in its daemon thread."""
    result: dict = {}

    def run():
        try:
            result["value"] = background()
        except BaseException as err:  # noqa: BLE001 - re-raised below in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    foreground()
    thread.join(timeout_s)
    if "value" not in result:
        raise result.get("error") or TimeoutError(f"the weight group did not form in {timeout_s} s")
    return result["value"]


class ServerEngine:
    """A `RolloutEngine` backed by a `reasonrl serve` process, local or remote.

    ``token``: the server's weight token (needed for `load_weights`; None: generation only). ``api_key``: the
    server's API key, if it was started with one."""

    def __init__(
        self,
        base_url: str,
        *,
        eos_token_ids: list[int],
        token: str | None = None,
        api_key: str | None = None,
        tokenizer=None,
        timeout_s: float = 600.0,
        weight_host: str | None = None,
        weight_dtype: torch.dtype | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        group_timeout_s: float = 300.0,
        max_concurrency: int = 64,
    ):
        self.client = ServerClient(base_url, timeout_s, api_key=api_key)
        self.token = token
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.tokenizer = tokenizer  # needed for stop strings only
        self.weight_host = weight_host or local_address_towards(urllib.parse.urlparse(self.client.base_url).hostname)
        self.weight_dtype = weight_dtype
        self.bucket_bytes = bucket_bytes
        self.group_timeout_s = group_timeout_s
        self.max_concurrency = max_concurrency
        self.group = None
        self.store = None
        self.pushes = 0
        models = self.client.get("/v1/models", timeout_s=30)["data"]
        self.model_name = models[0]["id"]
        self.dtype = self._server_dtype()
        if self.weight_dtype is None and self.dtype is not None:
            self.weight_dtype = getattr(torch, self.dtype)  # cast before sending: bf16 halves the bytes

    def _server_dtype(self) -> str | None:
        """The model dtype the server runs, from its ``/server_info`` (None if it does not say)."""
        try:
            info = json.dumps(self.client.get("/server_info", timeout_s=30))
        except ServerRequestError:
            return None
        found = re.search(r"dtype=torch\.(\w+)", info)
        return found.group(1) if found else None

    # ------------------------------------------------------------------ health

    def health(self) -> dict:
        """``{"healthy": True, "weight_version": ...}``; raises ``ServerUnavailableError`` if the server is down."""
        self.client.get("/health", timeout_s=30)
        return {"healthy": True, "weight_version": self.client.get("/weight_info", timeout_s=30)["weight_version"]}

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids, params: SamplingParams, max_new_tokens, logits_processors=None) -> RolloutOutput:
        if logits_processors:
            raise NotImplementedError("ServerEngine takes no per-call logits processors (vLLM v1 registers them at "
                                      "server start); use HFEngine for them")
        if len(max_new_tokens) != len(prompt_ids):
            raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {len(prompt_ids)} prompts")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer: ServerEngine(..., tokenizer=tokenizer)")
        payloads = [self._payload(list(p), params, budget, i) for i, (p, budget) in
                    enumerate(zip(prompt_ids, max_new_tokens))]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(payloads)))) as pool:
            responses = list(pool.map(self._complete, payloads))
        out = RolloutOutput([], [], [])
        greedy_copies = params.n if params.temperature == 0 else 1  # vLLM takes n=1 only when greedy
        for response in responses:
            choices = sorted(response["choices"], key=lambda c: c["index"]) * greedy_copies if response else []
            if not choices:
                out.append_empty(params.n)
            for choice in choices:
                ids = list(choice["token_ids"])
                out.completion_ids.append(ids)
                out.logprobs.append([float(x) for x in choice["logprobs"]["token_logprobs"]][: len(ids)])
                out.finish_reasons.append("length" if choice["finish_reason"] == "length" else "stop")
        if params.stop:  # the server stops on the text; cut the ids where every engine does
            cut_at_stop_strings(out, params.stop, text_decoder(self.tokenizer))
        return out

    def _complete(self, payload: dict | None) -> dict | None:
        return None if payload is None else self.client.post("/v1/completions", payload)

    def _payload(self, prompt: list[int], params: SamplingParams, budget: int, prompt_index: int) -> dict | None:
        """The same request as `VLLMEngine._vllm_params`, so both engines sample alike for one seed."""
        if budget <= 0:
            return None
        payload = {
            "model": self.model_name,
            "prompt": prompt,
            "n": 1 if params.temperature == 0 else params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "max_tokens": budget,
            "stop_token_ids": self.eos_token_ids,
            "stop": list(params.stop),
            "include_stop_str_in_output": True,
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
        }
        if params.seed is not None:
            payload["seed"] = params.request_seed(prompt_index)
        extra_args = request_extra_args(params)
        if extra_args:  # the OpenAI route takes flat values only: the processor's dict travels as JSON
            payload["vllm_xargs"] = {key: json.dumps(value) for key, value in extra_args.items()}
        return payload

    def prompt_logprobs(self, prompt_ids, completion_ids) -> list[list[float]]:
        """Teacher-forced log-probs (temperature 1) of each completion token; the parity probe after a push."""
        if len(prompt_ids) != len(completion_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")

        def score(pair):
            prompt, completion = list(pair[0]), list(pair[1])
            response = self.client.post("/v1/completions", {
                "model": self.model_name, "prompt": prompt + completion, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": 0, "return_token_ids": True,
            })
            positions = response["choices"][0]["prompt_logprobs"][len(prompt): len(prompt) + len(completion)]
            return [float(step[str(token)]["logprob"]) for token, step in zip(completion, positions)]

        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompt_ids)))) as pool:
            return list(pool.map(score, zip(prompt_ids, completion_ids)))

    # ------------------------------------------------------------------ weights

    def _weight_call(self, path: str, payload: dict | None = None, **kw):
        """A call on a route that changes the weights or the group: it carries the weight token."""
        return self.client.post(path, payload, headers={WEIGHT_TOKEN_HEADER: self.token}, **kw)

    def join(self) -> None:
        """Host the rendezvous store, have the server join, and keep the group for later pushes."""
        if not self.token:
            raise PermissionError(
                f"pushing weights to {self.client.base_url} needs the server's weight token: set {WEIGHT_TOKEN_ENV} "
                f"(or {WEIGHT_TOKEN_FILE_ENV}, a file holding it) to the secret the server was started with "
                f"(`reasonrl serve --weight-token-file`); {API_KEY_ENV} carries its --api-key, if any"
            )
        group_id = secrets.token_hex(16)
        self.store = rendezvous_store(self.weight_host, 0, is_master=True, timeout_s=self.group_timeout_s)
        init_info = {"master_address": self.weight_host, "master_port": self.store.port, "token": self.token,
                     "group_id": group_id, "timeout_s": self.group_timeout_s}
        try:
            self.group = _beside(
                lambda: join_group(self.store, rank=TRAINER_RANK, group_id=group_id, timeout_s=self.group_timeout_s),
                lambda: self._weight_call("/init_weight_transfer_engine", {"init_info": init_info}),
                timeout_s=self.group_timeout_s,
            )
        except BaseException:
            self.store = None
            raise

    def load_weights(self, named_tensors) -> None:
        """Push ``(hf_name, tensor)`` pairs: metadata over HTTP, bytes over gloo, bucket by bucket."""
        if self.group is None:
            self.join()
        tensors = {name: tensor.detach() for name, tensor in named_tensors}  # references: nothing copied yet
        metas = [tensor_meta(name, tensor, self.weight_dtype) for name, tensor in tensors.items()]
        update_info = {"token": self.token, "names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
                       "shapes": [list(m.shape) for m in metas], "bucket_bytes": self.bucket_bytes}
        self._weight_call("/start_weight_update")
        errors: list[BaseException] = []

        def post_update():
            try:
                self._weight_call("/update_weights", {"update_info": update_info})
            except BaseException as err:  # noqa: BLE001 - re-raised below in the caller's thread
                errors.append(err)

        receiver = threading.Thread(target=post_update, daemon=True)
        receiver.start()
        try:
            for bucket in plan_buckets(metas, self.bucket_bytes):
                if errors:
                    break
                # cast bucket by bucket, so at most one bucket of converted weights exists at a time
                broadcast_from_trainer(self.group, pack_bucket([self._wire(tensors[m.name]) for m in bucket]))
        finally:
            receiver.join(timeout=self.client.timeout_s)
        if errors:
            raise errors[0]
        self.pushes += 1
        self._weight_call("/finish_weight_update", {"weight_version": str(self.pushes)})
        self.client.post("/reset_prefix_cache")

    def _wire(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.weight_dtype is None else tensor.to(self.weight_dtype)

    def close(self) -> None:
        if self.group is not None:
            try:
                self._weight_call("/shutdown_weight_transfer_engine", timeout_s=30)
            except (ServerUnavailableError, ServerRequestError):
                pass
        self.group = None
        self.store = None
