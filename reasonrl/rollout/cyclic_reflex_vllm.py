"""CyclicReflex (docs/algorithms.md §8) in vLLM v1: the reflection-token logit bias of `reasonrl.rollout.cyclic_reflex`
as a batch-level vLLM logits processor, switched on per request through `SamplingParams.extra_args`.

`CyclicReflexSettings` holds one configuration (token ids, wave, windows, think-end token); it builds the transformers
processor for `HFEngine` (`hf_processor`) and the extra_args entry for vLLM (`to_extra_args`), so both engines apply
the same `reflex_bias`.

**vLLM 0.32 v1** (`vllm/v1/sample/sampler.py`): processors whose `is_argmax_invariant()` is False run on the float32
logits before the temperature division, also for greedy requests (argmax-invariant ones are skipped for greedy), so
ours declares False: the bias then acts "before temperature and top-p", as in the released code, and it changes the
greedy choice. Position p is the number of generated tokens: vLLM hands each added request a *reference* to its list
of output token ids (already holding the last sampled token when `apply` runs, also under async scheduling, which
repairs its placeholders first because custom processors are registered), so the processor keeps that reference and
reads `len(output_ids)` at every step. With "processed_logprobs" the returned log-probs include the bias.

The class is registered when `VLLMEngine` starts (it always is; a request without the extra_args entry is left
alone); `VLLMEngine(cyclic_reflex=CyclicReflexSettings(...))` adds the entry to every request of the engine.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from reasonrl.rollout.cyclic_reflex import (
    DEFAULT_WINDOWS,
    REFLECTION_WORDS,
    CyclicReflexLogitsProcessor,
    reflection_token_ids,
    reflex_bias,
    triangular_wave,
)

EXTRA_ARGS_KEY = "reasonrl_cyclic_reflex"  # SamplingParams.extra_args[EXTRA_ARGS_KEY] = settings.to_extra_args()[...]
THINK_END = "</think>"
_FIELDS = ("token_ids", "amplitude", "period", "shift", "windows", "think_end_id")


@dataclass(frozen=True)
class CyclicReflexSettings:
    """One CyclicReflex configuration; the arguments of `reflex_bias` plus the reflection token ids.

    Normalised on construction (sorted unique token ids, tuples, floats), so equal settings compare and hash equal.
    Raises ValueError for no token ids, a period < 1 or a window that is not a (start, end) pair.
    """

    token_ids: tuple[int, ...]
    amplitude: float
    period: int
    shift: float = 0.0
    windows: tuple[tuple[int, int], ...] = DEFAULT_WINDOWS
    think_end_id: int | None = None

    def __post_init__(self):
        token_ids = tuple(sorted({int(i) for i in self.token_ids}))
        if not token_ids:
            raise ValueError("CyclicReflex needs at least one reflection token id")
        if isinstance(self.period, bool) or int(self.period) != self.period:
            raise ValueError(f"period must be an integer, got {self.period!r}")
        triangular_wave(0, amplitude=1.0, period=int(self.period))  # validates the period
        try:
            windows = tuple((int(start), int(end)) for start, end in self.windows)
        except (TypeError, ValueError) as err:
            raise ValueError(f"windows must be (start, end) pairs, got {self.windows!r}") from err
        object.__setattr__(self, "token_ids", token_ids)
        object.__setattr__(self, "amplitude", float(self.amplitude))
        object.__setattr__(self, "period", int(self.period))
        object.__setattr__(self, "shift", float(self.shift))
        object.__setattr__(self, "windows", windows)
        object.__setattr__(self, "think_end_id", None if self.think_end_id is None else int(self.think_end_id))

    @classmethod
    def from_tokenizer(cls, tokenizer, *, amplitude: float, period: int, shift: float = 0.0,
                       words: Sequence[str] = REFLECTION_WORDS, windows: Sequence[tuple[int, int]] = DEFAULT_WINDOWS,
                       think_end: str | None = THINK_END) -> CyclicReflexSettings:
        """Settings for `tokenizer`: `words` that are exact vocabulary entries (see `reflection_token_ids`), and the
        think-end token if `think_end` is a single vocabulary entry (else modulation runs for the whole completion)."""
        token_ids = reflection_token_ids(tokenizer, words)
        if not token_ids:
            raise ValueError(f"none of the reflection words {list(words)} is a single token of this tokenizer")
        think_end_id = None
        if think_end is not None:
            found = tokenizer.convert_tokens_to_ids(think_end)
            think_end_id = None if found is None or found == tokenizer.unk_token_id else found
        return cls(tuple(token_ids), amplitude, period, shift, tuple(windows), think_end_id)

    def bias(self, generated: Sequence[int]) -> float:
        """`reflex_bias` for the next token after `generated`."""
        return reflex_bias(generated, amplitude=self.amplitude, period=self.period, shift=self.shift,
                           windows=self.windows, think_end_id=self.think_end_id)

    def hf_processor(self, prompt_width: int | None = None) -> CyclicReflexLogitsProcessor:
        """The transformers processor for `HFEngine.generate(..., logits_processors=[...])` (one per call unless
        `prompt_width` is given: see `CyclicReflexLogitsProcessor`)."""
        return CyclicReflexLogitsProcessor(self.token_ids, amplitude=self.amplitude, period=self.period,
                                           shift=self.shift, windows=self.windows, think_end_id=self.think_end_id,
                                           prompt_width=prompt_width)

    def to_extra_args(self) -> dict[str, Any]:
        """`SamplingParams(extra_args=...)` entries that switch the vLLM processor on for a request (JSON-able)."""
        return {EXTRA_ARGS_KEY: {
            "token_ids": list(self.token_ids), "amplitude": self.amplitude, "period": self.period,
            "shift": self.shift, "windows": [list(w) for w in self.windows], "think_end_id": self.think_end_id,
        }}

    @classmethod
    def from_extra_args(cls, value) -> CyclicReflexSettings:
        """The inverse of `to_extra_args()[EXTRA_ARGS_KEY]`; also takes it as a JSON string (the OpenAI server's
        `vllm_xargs` carry only flat values). Raises ValueError on anything else."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] is not valid JSON: {err}") from err
        if not isinstance(value, dict):  # ValueError: vLLM turns only ValueErrors from validate_params into a 400
            kind = type(value).__name__
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be a dict, got {kind}")  # noqa: TRY004
        unknown = set(value) - set(_FIELDS)
        missing = {"token_ids", "amplitude", "period"} - set(value)
        if unknown or missing:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] needs 'token_ids', 'amplitude', 'period' (optional "
                             f"'shift', 'windows', 'think_end_id'); got keys {sorted(value)}")
        try:
            return cls(**value)
        except TypeError as err:
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: {err}") from err


def request_settings(params) -> CyclicReflexSettings | None:
    """The settings carried by a vLLM request's `extra_args`, or None when it has none."""
    value = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    return None if value is None else CyclicReflexSettings.from_extra_args(value)


# ----------------------------------------------------------------------------------------------- vLLM v1 class

@functools.cache
def vllm_logits_processor_class() -> type:
    """The vLLM v1 logits processor class (built on first use so that this module imports without vllm).

    Register it when the engine starts: `LLM(..., logits_processors=[vllm_logits_processor_class()])`, or by name,
    "reasonrl.rollout.cyclic_reflex_vllm:VLLMCyclicReflexLogitsProcessor". Switch it on per request with
    `SamplingParams(extra_args=settings.to_extra_args())`.
    """
    return _build_vllm_class()


def __getattr__(name: str):  # lazy module attribute, so the name above resolves
    if name == "VLLMCyclicReflexLogitsProcessor":
        return vllm_logits_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build_vllm_class() -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor as VLLMLogitsProcessor
    from vllm.v1.sample.logits_processor.builtin import process_dict_updates

    class VLLMCyclicReflexLogitsProcessor(VLLMLogitsProcessor):
        """Adds `reflex_bias(output ids so far)` to the reflection tokens' logits of every row whose request carries
        `extra_args[EXTRA_ARGS_KEY]`; other rows are untouched.

        State: {batch row -> (settings, reference to the request's output token ids)}, kept in sync with vLLM's
        persistent batch by `update_state` (added / removed / moved rows). Rows with equal settings form one group:
        a step costs one `reflex_bias` call per row and one indexed add per group.
        """

        @classmethod
        def validate_params(cls, sampling_params) -> None:
            request_settings(sampling_params)

        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            self.device = device
            self.rows: dict[int, tuple[CyclicReflexSettings, list[int]]] = {}
            self._groups: list[tuple[CyclicReflexSettings, list[int], torch.Tensor, torch.Tensor]] | None = []

        def is_argmax_invariant(self) -> bool:
            """False: the bias changes the argmax, and vLLM runs only such processors before its temperature
            division and for greedy requests (see module docstring)."""
            return False

        def update_state(self, batch_update) -> None:
            def new_state(params, _prompt_ids, output_ids):
                settings = request_settings(params)
                return None if settings is None else (settings, output_ids)

            if process_dict_updates(self.rows, batch_update, new_state):
                self._groups = None

        def _row_groups(self):
            """[(settings, rows, row index tensor [R, 1], token id tensor [1, K])] for the current batch."""
            if self._groups is None:
                by_settings: dict[CyclicReflexSettings, list[int]] = {}
                for row, (settings, _) in self.rows.items():
                    by_settings.setdefault(settings, []).append(row)
                self._groups = []
                for settings, rows in by_settings.items():
                    rows = sorted(rows)
                    index = torch.tensor(rows, dtype=torch.long, device=self.device)[:, None]
                    token_ids = torch.tensor(settings.token_ids, dtype=torch.long, device=self.device)[None, :]
                    self._groups.append((settings, rows, index, token_ids))
            return self._groups

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            for settings, rows, index, token_ids in self._row_groups():
                bias = torch.tensor([settings.bias(self.rows[row][1]) for row in rows], dtype=logits.dtype)
                if not bias.any():
                    continue
                index, token_ids = index.to(logits.device), token_ids.to(logits.device)
                logits[index, token_ids] += bias.to(logits.device)[:, None]
            return logits

    VLLMCyclicReflexLogitsProcessor.__module__ = __name__
    VLLMCyclicReflexLogitsProcessor.__qualname__ = "VLLMCyclicReflexLogitsProcessor"
    return VLLMCyclicReflexLogitsProcessor
