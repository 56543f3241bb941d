"""HAPO Adaptive Temperature Sampling (docs/algorithms.md §1.1) as logits processors for transformers and vLLM v1.

Both processors make the final sampling distribution of each row softmax(logits / T_t) with
T_t = T0 (1 + τ ĥ_t) from `reasonrl.rl.hapo.adaptive_temperature` (ĥ_t from the entropy of the row's logits and the
previous step's `EntropyStats`). Neither engine lets a processor replace its own temperature division, so both
processors run *before* it and multiply the row by T_sampler / T_t, where T_sampler is the temperature the engine
divides by afterwards: (logits · T_sampler / T_t) / T_sampler = logits / T_t. Top-k / top-p then act on the adapted
distribution, as in the released sampler (divide by T_t, then min-p, top-k, top-p).

**transformers 5.19** (`GenerationMixin._get_logits_processor`): the list is built as
[built-in processors from the generation config (repetition penalty, no-repeat-ngram, bad words, min length, ...)],
then the user's `logits_processor=` entries (`_merge_criteria_processor_list` appends them), then, only when
`do_sample`, the former warpers in this order: TemperatureLogitsWarper (only if temperature != 1.0), top-h, top-k,
top-p, min-p, typical, epsilon, eta; then watermarking and LogitNormalization. So a custom processor sees the scores
after penalties but before temperature and truncation, and T_sampler = the `temperature` passed to `generate`.
`output_scores` returns the scores after all processors (= logits / T_t here); `output_logits` the raw logits.

**vLLM 0.32 v1** (`vllm/v1/sample/sampler.py`): logits are cast to float32, then allowed-token mask, bad words, the
processors with `is_argmax_invariant() == False` (built-ins min-tokens and logit-bias first, then custom classes),
then penalties, then (sampling requests only) division by `SamplingParams.temperature`, then the argmax-invariant
processors (min-p), then top-k / top-p. Our processor declares itself *not* argmax-invariant (it is, but that flag also
decides where it runs) so that it runs before the temperature division and sees undivided logits: T_sampler =
`SamplingParams.temperature`. Greedy requests (temperature < 1e-5) are left alone. With "processed_logprobs" the
returned log-probs are those of the adapted distribution.

Differences from the released (patched) vLLM sampler: additive frequency / presence penalties are applied after our
scaling here (before it there); multiplicative repetition penalty commutes with it. The recipes use no penalties.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import torch
from transformers import LogitsProcessor

from reasonrl.rl.hapo import SIGN_MODES, EntropyStats, adaptive_temperature

EXTRA_ARGS_KEY = "reasonrl_adaptive_temperature"  # SamplingParams.extra_args[EXTRA_ARGS_KEY] = vllm_extra_args(...)
_GREEDY_EPS = 1e-5  # vLLM treats temperature < 1e-5 as greedy


def _check_args(tau: float, base_temperature: float, sign_mode: str) -> None:
    if not (isinstance(tau, (int, float)) and 0.0 <= tau < 1.0):
        raise ValueError(f"tau must be in [0, 1), got {tau!r}")
    if not (isinstance(base_temperature, (int, float)) and base_temperature > 0 and math.isfinite(base_temperature)):
        raise ValueError(f"base_temperature must be a finite number > 0, got {base_temperature!r}")
    if sign_mode not in SIGN_MODES:
        raise ValueError(f"sign_mode must be one of {SIGN_MODES}, got {sign_mode!r}")


def _rescale(
    logits: torch.Tensor, *, stats: EntropyStats | None, tau: float, base_temperature: float, sign_mode: str,
    sampler_temperature: float,
) -> torch.Tensor:
    """logits · sampler_temperature / T_t, row by row (a new tensor, in logits' dtype)."""
    temps = adaptive_temperature(
        logits, base_temperature=base_temperature, stats=stats, tau=tau, sign_mode=sign_mode
    )
    factor = sampler_temperature / temps
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return (logits.to(dtype) * factor[:, None].to(dtype)).to(logits.dtype)


# ----------------------------------------------------------------------------------------------- transformers


class AdaptiveTemperatureLogitsProcessor(LogitsProcessor):
    """HF `LogitsProcessor` for `generate(..., logits_processor=[proc])`: final distribution softmax(logits / T_t).

    Args:
        stats: the previous step's `EntropyStats`; None (first step) or τ = 0 means T_t = T0. A plain attribute:
            the trainer replaces it each step (`proc.stats = new_stats`).
        tau: τ in T_t = T0 (1 + τ ĥ), 0 <= τ < 1 (recipes: 0.05).
        base_temperature: T0 (recipes: 1.0).
        sign_mode: "paper" or "released_code" (see reasonrl.rl.hapo).
        sampler_temperature: the temperature `generate` divides by after this processor (its `temperature` kwarg,
            applied by TemperatureLogitsWarper after custom processors). Defaults to `base_temperature`, i.e. call
            `generate(temperature=T0, logits_processor=[proc])`. Pass 1.0 if nothing divides afterwards.

    Scores on entry are the logits after HF's built-in processors (penalties, bad words, min length; -inf entries
    are fine); the entropy is that of softmax(scores). For greedy decoding the scaling does not change the argmax.
    """

    def __init__(
        self,
        stats: EntropyStats | None = None,
        *,
        tau: float,
        base_temperature: float = 1.0,
        sign_mode: str = "paper",
        sampler_temperature: float | None = None,
    ):
        _check_args(tau, base_temperature, sign_mode)
        if sampler_temperature is None:
            sampler_temperature = base_temperature
        if not sampler_temperature > 0:
            raise ValueError(f"sampler_temperature must be > 0, got {sampler_temperature}")
        if stats is not None and not isinstance(stats, EntropyStats):
            raise ValueError(f"stats must be an EntropyStats or None, got {type(stats).__name__}")
        self.stats = stats
        self.tau = float(tau)
        self.base_temperature = float(base_temperature)
        self.sign_mode = sign_mode
        self.sampler_temperature = float(sampler_temperature)

    def temperatures(self, scores: torch.Tensor) -> torch.Tensor:
        """T_t for each row of `scores` [B, V] -> [B] (float32)."""
        return adaptive_temperature(
            scores, base_temperature=self.base_temperature, stats=self.stats, tau=self.tau, sign_mode=self.sign_mode
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return _rescale(
            scores, stats=self.stats, tau=self.tau, base_temperature=self.base_temperature, sign_mode=self.sign_mode,
            sampler_temperature=self.sampler_temperature,
        )


# ----------------------------------------------------------------------------------------------- vLLM v1


def vllm_extra_args(
    stats: EntropyStats | None, *, tau: float, base_temperature: float = 1.0, sign_mode: str = "paper"
) -> dict[str, Any]:
    """`SamplingParams(extra_args=...)` entries that switch the vLLM processor on for a request.

    Merge into any other extra_args: `extra_args={**other, **vllm_extra_args(stats, tau=0.05)}`. `stats=None`
    returns {} (the processor then leaves the request alone, i.e. plain temperature sampling). `base_temperature`
    should equal `SamplingParams.temperature`; if it differs the row is still sampled at T_t = base_temperature (1 + τ ĥ).
    """
    _check_args(tau, base_temperature, sign_mode)
    if stats is None:
        return {}
    if not isinstance(stats, EntropyStats):
        raise TypeError(f"stats must be an EntropyStats or None, got {type(stats).__name__}")
    return {
        EXTRA_ARGS_KEY: {
            "stats": stats.to_list(),
            "tau": float(tau),
            "base_temperature": float(base_temperature),
            "sign_mode": sign_mode,
        }
    }


def request_extra_args(params) -> dict[str, Any]:
    """The extra_args that switch the vLLM processor on for a request built from our `SamplingParams` ({} when it
    samples without adaptive temperature, or greedily)."""
    spec = params.adaptive_temperature
    if spec is None or params.temperature <= 0:
        return {}
    return vllm_extra_args(EntropyStats.from_list(list(spec.stats)), tau=spec.tau,
                           base_temperature=params.temperature, sign_mode=spec.sign_mode)


def _parse_request(params) -> tuple | None:
    """(stats, tau, base_temperature, sign_mode, sampler_temperature) for a vLLM request, or None when the processor
    does nothing for it (no args under EXTRA_ARGS_KEY, τ = 0, or a greedy request). Raises ValueError on bad args."""
    args = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if args is None:
        return None
    if isinstance(args, str):  # the OpenAI server's `vllm_xargs` only carry flat values: the dict comes as JSON
        try:
            args = json.loads(args)
        except json.JSONDecodeError as err:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is not valid JSON: {err}") from err
    if not isinstance(args, dict):  # ValueError: vLLM turns only ValueErrors from validate_params into a 400
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a dict, got {type(args).__name__}")  # noqa: TRY004
    unknown = set(args) - {"stats", "tau", "base_temperature", "sign_mode"}
    if unknown or "stats" not in args or "tau" not in args:
        raise ValueError(
            f"extra_args[{EXTRA_ARGS_KEY!r}] needs 'stats' and 'tau' (optional 'base_temperature', 'sign_mode'); "
            f"got keys {sorted(args)}"
        )
    stats = EntropyStats.from_list(args["stats"])
    tau = args["tau"]
    base_temperature = args.get("base_temperature", params.temperature)
    sign_mode = args.get("sign_mode", "paper")
    _check_args(tau, base_temperature, sign_mode)
    if params.temperature < _GREEDY_EPS or tau == 0.0:
        return None
    return stats, float(tau), float(base_temperature), sign_mode, float(params.temperature)


@functools.cache
def vllm_logits_processor_class() -> type:
    """The vLLM v1 logits processor class (built on first use so that this module imports without vllm).

    Register it when the engine starts: `LLM(..., logits_processors=[vllm_logits_processor_class()])`, or by name,
    "reasonrl.rollout.adaptive_temperature:VLLMAdaptiveTemperatureLogitsProcessor" (also works across processes).
    Switch it on per request with `SamplingParams(extra_args=vllm_extra_args(stats, tau=...))`.
    """
    return _build_vllm_class()


def __getattr__(name: str):  # lazy module attribute, so the FQCN above resolves
    if name == "VLLMAdaptiveTemperatureLogitsProcessor":
        return vllm_logits_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_vllm_class() -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor as VLLMLogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class VLLMAdaptiveTemperatureLogitsProcessor(VLLMLogitsProcessor):
        """Batch-level vLLM v1 processor: rows of requests carrying `extra_args[EXTRA_ARGS_KEY]` are multiplied by
        SamplingParams.temperature / T_t before vLLM divides by SamplingParams.temperature; other rows untouched.

        State: {batch row -> request args}, kept in sync with vLLM's persistent batch through `update_state`
        (added / removed / moved rows). Rows with identical args (the usual case: one rollout call) are processed as
        one group, so a step costs one entropy pass over the adapted rows.
        """

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            _parse_request(sampling_params)

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            self.device = device
            self.rows: dict[int, tuple] = {}
            self._groups: list[tuple[tuple, torch.Tensor]] | None = []

        def is_argmax_invariant(self) -> bool:
            """False on purpose: vLLM runs non-invariant processors before its temperature division (see module
            docstring), which is where this one must run. The scaling itself never changes the argmax."""
            return False

        def update_state(self, batch_update) -> None:
            if process_dict_updates(self.rows, batch_update, lambda params, _prompt, _out: _parse_request(params)):
                self._groups = None

        def _row_groups(self) -> list[tuple[tuple, torch.Tensor]]:
            if self._groups is None:
                by_args: dict[tuple, list[int]] = {}
                for row, args in self.rows.items():  # EntropyStats is frozen, so the args tuple is hashable
                    by_args.setdefault(args, []).append(row)
                self._groups = [
                    (self.rows[rows[0]], torch.tensor(sorted(rows), dtype=torch.long, device=self.device))
                    for rows in by_args.values()
                ]
            return self._groups

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            for (stats, tau, base_temperature, sign_mode, sampler_temperature), index in self._row_groups():
                index = index.to(logits.device)
                logits[index] = _rescale(
                    logits.index_select(0, index), stats=stats, tau=tau, base_temperature=base_temperature,
                    sign_mode=sign_mode, sampler_temperature=sampler_temperature,
                )
            return logits

    VLLMAdaptiveTemperatureLogitsProcessor.__module__ = __name__
    VLLMAdaptiveTemperatureLogitsProcessor.__qualname__ = "VLLMAdaptiveTemperatureLogitsProcessor"
    return VLLMAdaptiveTemperatureLogitsProcessor
