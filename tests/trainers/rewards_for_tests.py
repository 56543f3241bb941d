"""Reward functions used by the trainer tests (imported as `module:function` from a recipe)."""


def digit_count(completions, **kwargs):
    """Varies between samples even for a random model, so GRPO advantages are non-zero."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def always_raises(completions, **kwargs):
    raise RuntimeError("this reward is broken on purpose")


def nan_on_every_other_sample(completions, **kwargs):
    """digit_count, but NaN (a failed score) for every second sample: a partial failure."""
    return [float("nan") if i % 2 else value for i, value in enumerate(digit_count(completions))]


_calls = {"n": 0}


def dies_on_rank1_at_step2(completions, **kwargs):
    """digit_count, except that the process of rank 1 dies abruptly (no cleanup, like a killed node) at its 2nd call."""
    import os

    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] == 2:
        os._exit(7)
    return digit_count(completions)
