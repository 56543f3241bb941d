"""Reward functions used by the trainer tests (imported as `module:function` from a recipe)."""


def digit_count(completions, **kwargs):
    """Varies between samples even for a random model, so GRPO advantages are non-zero."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def always_raises(completions, **kwargs):
    raise RuntimeError("this reward is broken on purpose")
