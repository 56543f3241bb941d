"""Stop strings: where a completion ends when its text first contains one of them (the stop string is kept, as EOS
is). Every engine cuts its completions with this one function, so they agree on where a completion ends."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def stop_cut(ids: Sequence[int], decode: Callable[[list[int]], str], stops: Sequence[str]) -> int | None:
    """The smallest k such that decode(ids[:k]) contains a stop string, or None. Binary search: once a prefix's text
    contains a stop string, every longer prefix's does too."""
    if not stops or not _contains(decode(list(ids)), stops):
        return None
    low, high = 1, len(ids)  # decode(ids[:high]) contains a stop string; find the smallest such high
    while low < high:
        mid = (low + high) // 2
        if _contains(decode(list(ids[:mid])), stops):
            high = mid
        else:
            low = mid + 1
    return high


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """The decode function the cuts use: the tokens' text, special tokens included."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)


def _contains(text: str, stops: Sequence[str]) -> bool:
    return any(stop in text for stop in stops)


def cut_at_stop_strings(out, stops: Sequence[str], decode: Callable[[list[int]], str]) -> None:
    """Cut every completion of a RolloutOutput (in place) at its first stop string; its reason becomes "stop"."""
    for i, ids in enumerate(out.completion_ids):
        cut = stop_cut(ids, decode, stops)
        if cut is None:
            continue
        out.completion_ids[i] = ids[:cut]
        out.logprobs[i] = out.logprobs[i][:cut]
        if out.entropies is not None:
            out.entropies[i] = out.entropies[i][:cut]
        if out.versions is not None:
            out.versions[i] = out.versions[i][:cut]
        out.finish_reasons[i] = "stop"
