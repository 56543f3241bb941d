"""`rollout.engine=server`: generation by a separate vLLM server (`reasonrl serve`), weights pushed over gloo.

Generation goes through vLLM's OpenAI ``/v1/completions`` route with token ids in and out (``return_token_ids``),
one request per prompt with ``n`` samples, sent concurrently so the server batches them. Weight pushes use vLLM's RL
routes with the ``gloo`` backend (``gloo_transfer``): this process hosts the rendezvous store, the server joins, and
each push streams bucketed bytes. Pushes need the server's weight token and, if it has one, every call its API key
(``server_auth``; `build_engine` reads both from the environment).

Every wait is bounded by ``timeout_s`` (``rollout.server_timeout_s``): each HTTP call, each bucket of a push (its
``/update_weights`` call and its gloo broadcast together), the weight group's rendezvous. A server that is down, dies
or hangs raises ``ServerUnavailableError`` (``WeightPushError`` during a push) naming the URL, what was being done and
how long it waited; never a hang, and never gloo's own error, which would read as a dead process of the training job.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import queue
import re
import secrets
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from reasonrl.rollout.adaptive_temperature import request_extra_args
from reasonrl.rollout.base import RolloutOutput, SamplingParams
from reasonrl.rollout.server_auth import API_KEY_ENV, WEIGHT_TOKEN_ENV, WEIGHT_TOKEN_FILE_ENV, WEIGHT_TOKEN_HEADER
from reasonrl.rollout.stops import cut_at_stop_strings, text_decoder
from reasonrl.rollout.versions import VersionGate
from reasonrl.rollout.weight_buckets import DEFAULT_BUCKET_BYTES, TensorMeta, stream_buckets
from reasonrl.rollout.weight_group import broadcast_from_trainer, join_group, rendezvous_store

TRAINER_RANK = 0
TIMEOUT_KEY = "rollout.server_timeout_s"
NO_OPEN_UPDATE = "without a matching start_weight_update"  # vLLM 0.32 worker's answer to a finish with no update open
QUICK_CALL_S = 30.0  # health and start-up probes: an answer is immediate, so no need to wait the full timeout


class ServerUnavailableError(RuntimeError):
    """The vLLM server did not answer in time (not started, killed, hung, or unreachable)."""


class WeightPushError(ServerUnavailableError):
    """A weight push did not complete: the server died or hung during it, or the gloo transfer to it failed. It
    replaces the transport's own error, whose text ("connection closed by peer") would read as another process of the
    training job having died (`reasonrl.trainers.distributed.is_peer_failure`)."""


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
        self.down = False  # whether the last call found the server dead or hung

    def request(self, method: str, path: str, payload: dict | None = None, *, timeout_s: float | None = None,
                headers: dict | None = None):
        """The JSON answer. ``timeout_s`` (at most the client's) bounds each socket operation, which bounds the call:
        vLLM sends a non-streamed answer only once it is complete, so a stalled server sends nothing at all."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={**self.headers, **(headers or {})})
        timeout = min(timeout_s or self.timeout_s, self.timeout_s)
        start = time.monotonic()
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as err:
            raise ServerRequestError(path, err.code, err.read().decode(errors="replace")) from err
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as err:
            self.down = True
            raise ServerUnavailableError(
                f"vLLM server at {self.base_url} did not answer {method} {path} ({getattr(err, 'reason', err)!s} "
                f"after {time.monotonic() - start:.1f} s; {TIMEOUT_KEY}={self.timeout_s:g}); is `reasonrl serve` "
                "running and reachable?"
            ) from err
        self.down = False
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


def _together(*calls, timeout_s: float) -> list:
    """The calls' results, each run in a daemon thread, once all have returned; ``TimeoutError`` if they have not in
    ``timeout_s``. The two sides of a weight transfer (our collective, the server's HTTP call that receives it) wait for
    each other, and either may fail first: a refusal or a dead server is raised at once, the other side left to end on
    its own timeout in its thread."""
    done: queue.SimpleQueue = queue.SimpleQueue()

    def run(index, call):
        try:
            done.put((index, call(), None))
        except BaseException as err:  # noqa: BLE001 - re-raised below in the caller's thread
            done.put((index, None, err))

    for index, call in enumerate(calls):
        threading.Thread(target=run, args=(index, call), daemon=True).start()
    results = [None] * len(calls)
    deadline = time.monotonic() + timeout_s
    for _ in calls:
        try:
            index, value, error = done.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"not done in {timeout_s:g} s") from None
        if error is not None:
            raise error
        results[index] = value
    return results


def gloo_broadcast(group, buffer: torch.Tensor, *, timeout_s: float) -> None:
    """`broadcast_from_trainer` with gloo's errors (dead peer, timeout; DistError is a RuntimeError too) raised as
    ``ServerUnavailableError``: their own text reads as a dead process of the training job."""
    try:
        broadcast_from_trainer(group, buffer, timeout_s=timeout_s)
    except RuntimeError as err:
        first_line = (str(err).splitlines() or [""])[0]
        raise ServerUnavailableError(
            f"the gloo transfer to the server failed ({type(err).__name__}: {first_line})"
        ) from err


class ServerEngine:
    """A `RolloutEngine` backed by a `reasonrl serve` process, local or remote.

    ``token``: the server's weight token (needed for `load_weights`; None: generation only). ``api_key``: the
    server's API key, if it was started with one. ``timeout_s``: the longest any one wait may take (an HTTP call, a
    bucket of a push). ``bucket_bytes``: a push's memory budget, the bytes of one bucket (a larger tensor gets one of
    its own). ``group_timeout_s``: the weight group's rendezvous and the server's waits for a bucket (None:
    ``timeout_s``). ``chunk_tokens``: generate in chunks of that many tokens, so that a push from another thread lands
    between two chunks and the sequences in progress continue with the new weights (None: a push waits until the
    batch in progress is done). Every token records the version of the weights that sampled it (`VersionGate`)."""

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
        group_timeout_s: float | None = None,
        max_concurrency: int = 64,
        chunk_tokens: int | None = None,
    ):
        self.client = ServerClient(base_url, timeout_s, api_key=api_key)
        self.token = token
        self.eos_token_ids = sorted(set(eos_token_ids))
        self.tokenizer = tokenizer  # needed for stop strings only
        self.weight_host = weight_host or local_address_towards(urllib.parse.urlparse(self.client.base_url).hostname)
        self.weight_dtype = weight_dtype
        self.bucket_bytes = bucket_bytes
        self.group_timeout_s = timeout_s if group_timeout_s is None else group_timeout_s
        self.max_concurrency = max_concurrency
        self.group = None
        self.store = None
        self.pushes = 0
        self.gate = VersionGate()
        self.chunk_tokens = chunk_tokens
        models = self.client.get("/v1/models", timeout_s=QUICK_CALL_S)["data"]
        self.model_name = models[0]["id"]
        self.dtype = self._server_dtype()
        if self.weight_dtype is None and self.dtype is not None:
            self.weight_dtype = getattr(torch, self.dtype)  # cast before sending: bf16 halves the bytes

    def _server_dtype(self) -> str | None:
        """The model dtype the server runs, from its ``/server_info`` (None if it does not say)."""
        try:
            info = json.dumps(self.client.get("/server_info", timeout_s=QUICK_CALL_S))
        except ServerRequestError:
            return None
        found = re.search(r"dtype=torch\.(\w+)", info)
        return found.group(1) if found else None

    # ------------------------------------------------------------------ health

    def health(self) -> dict:
        """``{"healthy": True, "weight_version": ...}``; raises ``ServerUnavailableError`` if the server is down."""
        self.client.get("/health", timeout_s=QUICK_CALL_S)
        version = self.client.get("/weight_info", timeout_s=QUICK_CALL_S)["weight_version"]
        return {"healthy": True, "weight_version": version}

    # ------------------------------------------------------------------ generation

    def generate(self, prompt_ids, params: SamplingParams, max_new_tokens, logits_processors=None) -> RolloutOutput:
        if logits_processors:
            raise NotImplementedError("ServerEngine takes no per-call logits processors (vLLM v1 registers them at "
                                      "server start); use HFEngine for them")
        if len(max_new_tokens) != len(prompt_ids):
            raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {len(prompt_ids)} prompts")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer: ServerEngine(..., tokenizer=tokenizer)")
        if self.chunk_tokens is None:
            with self.gate.chunk() as version:
                out = self._generate_once(prompt_ids, params, max_new_tokens)
            out.versions = [[version] * len(ids) for ids in out.completion_ids]
        else:
            out = self._generate_in_chunks(prompt_ids, params, max_new_tokens)
        if params.stop:  # the server stops on the text; cut the ids where every engine does
            cut_at_stop_strings(out, params.stop, text_decoder(self.tokenizer))
        return out

    def _generate_once(self, prompt_ids, params: SamplingParams, max_new_tokens) -> RolloutOutput:
        payloads = [self._payload(list(p), params, budget, i) for i, (p, budget) in
                    enumerate(zip(prompt_ids, max_new_tokens))]
        responses = self._concurrently(self._complete, payloads,
                                       f"generating {len(payloads)} prompts x {params.n} samples")
        out = RolloutOutput([], [], [])
        greedy_copies = params.n if params.temperature == 0 else 1  # vLLM takes n=1 only when greedy
        for response in responses:
            choices = sorted(response["choices"], key=lambda c: c["index"]) * greedy_copies if response else []
            if not choices:
                out.append_empty(params.n)
            for choice in choices:
                ids, logps, reason = _choice_tokens(choice)
                out.completion_ids.append(ids)
                out.logprobs.append(logps)
                out.finish_reasons.append(reason)
        return out

    def _generate_in_chunks(self, prompt_ids, params: SamplingParams, max_new_tokens) -> RolloutOutput:
        """`chunk_tokens` tokens at a time: the first chunk samples ``n`` per prompt, each later one continues every
        unfinished sample (its prompt and tokens so far, one request each, seeded by chunk and sample) with the
        weights of that moment, which re-reads the sequence with them (the prefix cache is reset by every push)."""
        n, chunk = params.n, self.chunk_tokens
        budgets = [budget for budget in max_new_tokens for _ in range(n)]
        prompts = [list(p) for p in prompt_ids for _ in range(n)]
        with self.gate.chunk() as version:
            out = self._generate_once(prompt_ids, params, [min(b, chunk) for b in max_new_tokens])
        out.versions = [[version] * len(ids) for ids in out.completion_ids]
        pending = [i for i in range(len(prompts)) if _continues(out, i, budgets[i])]
        for index in range(1, max(budgets, default=0)):
            if not pending:
                break
            one = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + 7_919 * index)
            with self.gate.chunk() as version:
                payloads = [self._payload(prompts[i] + out.completion_ids[i], one,
                                          min(chunk, budgets[i] - len(out.completion_ids[i])), i) for i in pending]
                responses = self._concurrently(self._complete, payloads, f"continuing {len(pending)} samples")
            for i, response in zip(pending, responses):
                ids, logps, out.finish_reasons[i] = _choice_tokens(response["choices"][0])
                out.completion_ids[i] += ids
                out.logprobs[i] += logps
                out.versions[i] += [version] * len(ids)
            pending = [i for i in pending if _continues(out, i, budgets[i])]
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

        return self._concurrently(score, list(zip(prompt_ids, completion_ids)),
                                  f"scoring {len(prompt_ids)} sequences teacher-forced")

    def _concurrently(self, call, items: list, doing: str) -> list:
        """``[call(item) for item in items]``, ``max_concurrency`` calls at a time. The first failure cancels the calls
        not sent yet: a dead or hung server then ends the batch within one timeout, not one per wave of requests."""
        failed = threading.Event()

        def guarded(item):
            if failed.is_set():  # a worker freed by a failed call takes no new item: that one would wait again
                return None
            try:
                return call(item)
            except BaseException:
                failed.set()
                raise

        pool = ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(items))))
        try:
            return list(pool.map(guarded, items))
        except ServerUnavailableError as err:
            raise ServerUnavailableError(f"{doing}: {err}") from err
        finally:
            pool.shutdown(wait=False, cancel_futures=True)  # the calls in flight end on their own timeout

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
            # joining blocks until the server has joined too; the server answers the call once it has, or at once
            # when it refuses (wrong token, a group already active)
            self.group, _ = _together(
                lambda: join_group(self.store, rank=TRAINER_RANK, group_id=group_id, timeout_s=self.group_timeout_s),
                lambda: self._weight_call("/init_weight_transfer_engine", {"init_info": init_info}),
                timeout_s=self.group_timeout_s,
            )
        except TimeoutError as err:
            self.store = None
            raise ServerUnavailableError(
                f"the weight group with {self.client.base_url} did not form in {self.group_timeout_s:g} s: the server "
                "did not answer /init_weight_transfer_engine, or could not reach this machine's store at "
                f"{self.weight_host}:{init_info['master_port']} (rollout.weight_host must be an address it can reach)"
            ) from err
        except BaseException:
            self.store = None
            raise
        self._end_abandoned_update()

    def _end_abandoned_update(self) -> None:
        """Finish an update that an earlier trainer started and never finished (killed, or stopped by a failed push,
        between two buckets): vLLM refuses every new one until then. What it had loaded is finalised; our next push
        replaces all of it. Only after our join: while another trainer's group is alive, joining is refused."""
        try:
            self._weight_call("/finish_weight_update")
        except ServerRequestError as err:
            if NO_OPEN_UPDATE not in err.body:
                raise

    def load_weights(self, named_tensors) -> None:
        """Push ``(hf_name, tensor)`` pairs, bucket by bucket: each bucket is one ``/update_weights`` call with its
        tensors' metadata while its bytes go over gloo. The pairs are read lazily (`stream_buckets`): the push holds one
        bucket of cast bytes, ``bucket_bytes`` (or the largest tensor), and at most one of the pairs' tensors, so a
        producer that gathers shards (ZeRO-3) or merges adapters (LoRA) never has the whole model out at once. A server
        that dies or hangs raises `WeightPushError` within ``timeout_s`` of its last progress."""
        push = _PushProgress(self.client.base_url, self.client.timeout_s)
        try:
            self._push(named_tensors, push)
        except ServerUnavailableError as err:
            self._drop_group()
            raise WeightPushError(push.failed(err)) from err
        except BaseException:
            self._drop_group()
            raise

    def _push(self, named_tensors, push: _PushProgress) -> None:
        if self.group is None:
            push.stage = "joining the weight group"
            self.join()
        push.stage = "starting the update"
        self._weight_call("/start_weight_update")
        for metas, buffer in stream_buckets(named_tensors, self.bucket_bytes, self.weight_dtype):
            push.next_bucket(metas, buffer.numel())
            self._push_bucket(metas, buffer)
        push.stage = "finishing the update"
        self._weight_call("/finish_weight_update", {"weight_version": str(self.pushes + 1)})
        self.pushes += 1
        self.client.post("/reset_prefix_cache")

    def _push_bucket(self, metas: list[TensorMeta], buffer: torch.Tensor) -> None:
        """One bucket: the server's ``/update_weights`` call receives and loads what we broadcast."""
        update_info = {"token": self.token, "names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
                       "shapes": [list(m.shape) for m in metas], "bucket_bytes": self.bucket_bytes}
        try:
            _together(lambda: gloo_broadcast(self.group, buffer, timeout_s=self.client.timeout_s),
                      lambda: self._weight_call("/update_weights", {"update_info": update_info}),
                      timeout_s=self.client.timeout_s)
        except TimeoutError as err:
            raise ServerUnavailableError(
                f"the server did not receive and load the bucket in {self.client.timeout_s:g} s"
            ) from err

    def _drop_group(self) -> None:
        """After a failed push the group is unusable (gloo closes a pair that timed out): the next push forms a new
        one, and `close` has nothing to shut down."""
        self.group = None
        self.store = None

    def close(self) -> None:
        """Close the weight group on the server, unless the server was just found dead or hung: a run that stops
        because of it must not wait for it once more."""
        if self.group is not None and not self.client.down:
            try:
                self._weight_call("/shutdown_weight_transfer_engine", timeout_s=QUICK_CALL_S)
            except (ServerUnavailableError, ServerRequestError):
                pass
        self._drop_group()


def _choice_tokens(choice: dict) -> tuple[list[int], list[float], str]:
    """A completion choice's (token ids, their log-probs, finish reason "stop" or "length")."""
    ids = list(choice["token_ids"])
    logps = [float(x) for x in choice["logprobs"]["token_logprobs"]][: len(ids)]
    return ids, logps, "length" if choice["finish_reason"] == "length" else "stop"


def _continues(out: RolloutOutput, i: int, budget: int) -> bool:
    """Whether sample ``i`` stopped only because its chunk ended: not at EOS or a stop string, budget left."""
    return out.finish_reasons[i] == "length" and len(out.completion_ids[i]) < budget


class _PushProgress:
    """Where a push stands, for the error that stops it."""

    def __init__(self, base_url: str, timeout_s: float):
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.start = time.monotonic()
        self.stage = "starting"
        self.buckets = 0
        self.loaded_bytes = 0
        self._current_bytes = 0

    def next_bucket(self, metas: list[TensorMeta], nbytes: int) -> None:
        self.loaded_bytes += self._current_bytes  # asked for the next one: the previous bucket was loaded
        self.buckets += 1
        self._current_bytes = nbytes
        self.stage = (f"bucket {self.buckets} ({len(metas)} tensors from {metas[0].name}, {nbytes / 2**20:.2f} MiB; "
                      f"{self.buckets - 1} buckets, {self.loaded_bytes / 2**20:.2f} MiB loaded before it)")

    def failed(self, err: BaseException) -> str:
        return (f"weight push to {self.base_url} stopped at {self.stage}, {time.monotonic() - self.start:.1f} s into "
                f"the push (each step may take {TIMEOUT_KEY}={self.timeout_s:g} s; the server's log says why it died "
                f"or stalled): {err}")
