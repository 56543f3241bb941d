"""CyclicReflex (docs/algorithms.md §8): a zero-mean triangular wave added to the logits of reflection tokens
("wait", "but", ...) while the model is thinking, so reflection is encouraged and discouraged in cycles.

The pure parts (`triangular_wave`, `reflex_bias`) hold the method; `CyclicReflexLogitsProcessor` applies it in
transformers' `generate` (before temperature and top-p, as the released code does in vLLM). Position p counts
generated tokens; modulation stops once the think-end token has been generated, and only runs inside `windows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

REFLECTION_WORDS = ("wait", "Wait", "but", "But", "Alternatively")  # exact vocabulary entries, as released
DEFAULT_WINDOWS = ((0, 8192),)


def triangular_wave(position: int, *, amplitude: float, period: int, shift: float = 0.0) -> float:
    """delta(p): 0 at p = 0, +A at P/4, 0 at P/2, -A at 3P/4, back to 0 at P (phase c = ((p + shift P) mod P) / P)."""
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    c = ((position + shift * period) % period) / period
    if c <= 0.25:
        return 4 * amplitude * c
    if c <= 0.75:
        return amplitude - 4 * amplitude * (c - 0.25)
    return -amplitude + 4 * amplitude * (c - 0.75)


def in_windows(position: int, windows: Sequence[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in windows)


def reflex_bias(generated: Sequence[int], *, amplitude: float, period: int, shift: float = 0.0,
                windows: Sequence[tuple[int, int]] = DEFAULT_WINDOWS, think_end_id: int | None = None) -> float:
    """The bias added to every reflection token's logit for the next token after `generated` (0 once the think-end
    token was generated, or outside the windows)."""
    if think_end_id is not None and think_end_id in generated:
        return 0.0
    p = len(generated)
    if not in_windows(p, windows):
        return 0.0
    return triangular_wave(p, amplitude=amplitude, period=period, shift=shift)


def reflection_token_ids(tokenizer, words: Sequence[str] = REFLECTION_WORDS) -> list[int]:
    """Vocabulary ids of `words` as exact tokens (leading-space variants such as "Ġwait" are not included, as
    released); words that are not single tokens are skipped."""
    unk = tokenizer.unk_token_id
    ids = [tokenizer.convert_tokens_to_ids(w) for w in words]
    return sorted({i for i in ids if i is not None and i != unk})


class CyclicReflexLogitsProcessor(LogitsProcessor):
    """transformers `LogitsProcessor`: adds `reflex_bias` to the reflection tokens' logits of every row.

    `prompt_width` is the (left-padded) prompt width of the batch, so that `input_ids[:, prompt_width:]` are the
    generated tokens; None takes the width seen at the first call (use one instance per `generate` call then).
    """

    def __init__(self, token_ids: Sequence[int], *, amplitude: float, period: int, shift: float = 0.0,
                 windows: Sequence[tuple[int, int]] = DEFAULT_WINDOWS, think_end_id: int | None = None,
                 prompt_width: int | None = None):
        if not token_ids:
            raise ValueError("CyclicReflex needs at least one reflection token id")
        triangular_wave(0, amplitude=amplitude, period=period)  # validates the period
        self.token_ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)
        self.amplitude, self.period, self.shift = float(amplitude), int(period), float(shift)
        self.windows, self.think_end_id, self.prompt_width = tuple(windows), think_end_id, prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_width is None:
            self.prompt_width = input_ids.shape[1]
        generated = input_ids[:, self.prompt_width:].tolist()
        bias = torch.tensor([reflex_bias(row, amplitude=self.amplitude, period=self.period, shift=self.shift,
                                         windows=self.windows, think_end_id=self.think_end_id) for row in generated],
                            dtype=scores.dtype, device=scores.device)
        out = scores.clone()
        ids = self.token_ids.to(scores.device)
        out[:, ids] = out[:, ids] + bias[:, None]
        return out
