"""Token-based Power scheduler (IBM, arXiv 2408.13359) and a step-based warmup-stable-decay (WSD) factor.

Power scheduler, with n the tokens seen, N_w warmup tokens, N total tokens, N_d decay tokens, beta the batch size
in sequences per optimizer step (docs/algorithms.md section 6.1):
  eta_pow(n) = min(eta_max, beta * a * n^b)
  eta(n) = (n / N_w) * eta_pow(N_w)                        for n < N_w
  eta(n) = eta_pow(n)                                      for N_w <= n < N - N_d
  eta(n) = eta_pre(N - N_d) * g((n - (N - N_d)) / N_d)     for n >= N - N_d  (g clamped at x = 1 past N)
g decays from g(0) = 1 to g(1) = final_factor; see ``decay_factor`` for the shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

DECAY_SHAPES = ("exponential", "linear", "cosine")

# Time constant of the exponential decay, in units of the decay window: f(x) = A e^{-x/T} + B with T = 1, i.e.
# the doc's dolomite form with f(0) = 1 and f(T) = final_factor where T is the length of the decay phase.
EXP_TIME_CONSTANT = 1.0


def _check_number(value, name: str, *, low: float | None = None, low_open: bool = False, high: float | None = None):
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    too_low = low is not None and (v <= low if low_open else v < low)
    if not math.isfinite(v) or too_low or (high is not None and v > high):
        bounds = ["finite"]
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"<= {high}")
        raise ValueError(f"{name} must be {' and '.join(bounds)}, got {value}")
    return v


def decay_factor(x: float, *, decay: str, final_factor: float = 0.0, time_constant: float = EXP_TIME_CONSTANT) -> float:
    """g(x) for decay progress x in [0, 1] (clamped), with g(0) = 1 and g(1) = f = final_factor:

    linear:      g = 1 - (1 - f) x
    cosine:      g = f + (1 - f) (1 + cos(pi x)) / 2
    exponential: g = A e^{-x/T} + B,  A = (1 - f) / (1 - e^{-1/T}),  B = 1 - A   (T = time_constant)
    """
    if decay not in DECAY_SHAPES:
        raise ValueError(f"unknown decay {decay!r}; expected one of {DECAY_SHAPES}")
    f = _check_number(final_factor, "final_factor", low=0.0, high=1.0)
    t = _check_number(time_constant, "time_constant", low=0.0, low_open=True)
    x = min(1.0, max(0.0, _check_number(x, "x")))
    if decay == "linear":
        return 1.0 - (1.0 - f) * x
    if decay == "cosine":
        return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * x))
    amp = (1.0 - f) / -math.expm1(-1.0 / t)
    return amp * math.exp(-x / t) + (1.0 - amp)


def _power_value(n: float, *, a: float, b: float, batch_size: float, lr_max: float) -> float:
    """min(lr_max, batch_size * a * n^b); n = 0 gives the n -> 0+ limit (lr_max for b < 0)."""
    if n == 0:
        return lr_max if b < 0 else min(lr_max, batch_size * a)
    return min(lr_max, batch_size * a * n**b)


def power_lr(
    tokens_seen: float,
    *,
    a: float,
    b: float = -0.51,
    batch_size: float,
    lr_max: float,
    warmup_tokens: float,
    total_tokens: float | None = None,
    decay_tokens: float = 0,
    decay: str = "exponential",
    final_factor: float = 0.0,
    time_constant: float = EXP_TIME_CONSTANT,
) -> float:
    """Power-scheduler learning rate after ``tokens_seen`` tokens (module docstring for the formula).

    Warmup is linear from 0 at n = 0 to eta_pow(N_w). Decay (only when decay_tokens > 0, which needs
    total_tokens) starts at N - N_d from the value the schedule had there and ends at final_factor times it at N;
    it is held afterwards. Requires b <= 0 (b = 0 is a constant min(lr_max, beta * a)) and N - N_d >= N_w.
    """
    n = _check_number(tokens_seen, "tokens_seen", low=0.0)
    a = _check_number(a, "a", low=0.0, low_open=True)
    b = _check_number(b, "b", high=0.0)
    beta = _check_number(batch_size, "batch_size", low=0.0, low_open=True)
    lr_max = _check_number(lr_max, "lr_max", low=0.0, low_open=True)
    n_w = _check_number(warmup_tokens, "warmup_tokens", low=0.0)
    n_d = _check_number(decay_tokens, "decay_tokens", low=0.0)
    if decay not in DECAY_SHAPES:
        raise ValueError(f"unknown decay {decay!r}; expected one of {DECAY_SHAPES}")
    _check_number(final_factor, "final_factor", low=0.0, high=1.0)
    if total_tokens is not None:
        total = _check_number(total_tokens, "total_tokens", low=0.0, low_open=True)
        if n_d > total:
            raise ValueError(f"decay_tokens ({decay_tokens}) > total_tokens ({total_tokens})")
        if n_d > 0 and total - n_d < n_w:
            raise ValueError(
                f"decay_tokens ({decay_tokens}) overlaps the warmup: total_tokens - decay_tokens < warmup_tokens "
                f"({total_tokens} - {decay_tokens} < {warmup_tokens})"
            )
    elif n_d > 0:
        raise ValueError(f"decay_tokens ({decay_tokens}) > 0 needs total_tokens")

    def pre_decay(m: float) -> float:
        if m < n_w:
            return m / n_w * _power_value(n_w, a=a, b=b, batch_size=beta, lr_max=lr_max)
        return _power_value(m, a=a, b=b, batch_size=beta, lr_max=lr_max)

    if n_d > 0:
        start = total - n_d
        if n >= start:
            g = decay_factor((n - start) / n_d, decay=decay, final_factor=final_factor, time_constant=time_constant)
            return pre_decay(start) * g
    return pre_decay(n)


def solve_power_a(target_lr: float, *, at_tokens: float, b: float, batch_size: float) -> float:
    """The a for which batch_size * a * at_tokens^b = target_lr: a = target_lr / (batch_size * at_tokens^b).

    Ignores the lr_max cap (pass lr_max >= target_lr to power_lr to actually reach target_lr at at_tokens).
    """
    lr = _check_number(target_lr, "target_lr", low=0.0, low_open=True)
    n = _check_number(at_tokens, "at_tokens", low=0.0, low_open=True)
    b = _check_number(b, "b", high=0.0)
    beta = _check_number(batch_size, "batch_size", low=0.0, low_open=True)
    return lr / (beta * n**b)


def wsd_lr_factor(
    step: int,
    *,
    warmup_steps: int,
    total_steps: int,
    decay_steps: int,
    decay: str = "exponential",
    final_factor: float = 0.0,
    time_constant: float = EXP_TIME_CONSTANT,
) -> float:
    """Warmup-stable-decay multiplier of the base LR for optimizer step ``step`` (0-based, like ``lr_factor``).

    warmup: (step + 1) / warmup_steps for step < warmup_steps (reaches 1 on the last warmup step);
    stable: 1; decay: g((step - D) / decay_steps) from D = total_steps - decay_steps on (``decay_factor``), so
    step D has factor 1 and step total_steps has final_factor; the last trained step (total_steps - 1) is one
    decay increment above it, so no step runs at lr 0. Held at final_factor after total_steps.
    Requires warmup_steps + decay_steps <= total_steps.
    """
    for name, value in (("warmup_steps", warmup_steps), ("total_steps", total_steps), ("decay_steps", decay_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if warmup_steps + decay_steps > total_steps:
        raise ValueError(
            f"warmup_steps + decay_steps ({warmup_steps} + {decay_steps}) > total_steps ({total_steps})"
        )
    if decay not in DECAY_SHAPES:
        raise ValueError(f"unknown decay {decay!r}; expected one of {DECAY_SHAPES}")
    s = _check_number(step, "step", low=0.0)
    _check_number(final_factor, "final_factor", low=0.0, high=1.0)
    if s < warmup_steps:
        return (s + 1) / warmup_steps
    start = total_steps - decay_steps
    if decay_steps > 0 and s >= start:
        return decay_factor((s - start) / decay_steps, decay=decay, final_factor=final_factor,
                            time_constant=time_constant)
    return 1.0


class TokenPowerScheduler(LRScheduler):
    """Sets every param group's lr to ``power_lr(tokens_seen, ...)`` (times ``group_scales[i]``, default 1).

    The optimizer's own lr (``initial_lr``) is ignored. Token accounting, two equivalent ways:
      * ``add_tokens(n)`` BEFORE ``optimizer.step()``: increments the count and applies eta(count) at once, so an
        optimizer step runs at eta(tokens including its own), like ``lr_factor``'s (step + 1) warmup; then
        ``scheduler.step()`` only advances the step counters and re-applies eta(count).
      * ``step(tokens_seen=n)`` after ``optimizer.step()``: sets the ABSOLUTE count n and applies eta(n) for the
        next optimizer step.
    ``step()`` never adds tokens, so it is idempotent: accelerate's AcceleratedScheduler calls it num_processes
    times per optimizer step (split_batches=False) without changing the result. The wrapper does not forward
    ``add_tokens``; reach the raw scheduler with ``getattr(sched, "scheduler", sched)``.

    ``state_dict()`` holds only counters (tokens_seen, last_epoch, _step_count); ``load_state_dict`` restores them
    and re-applies the lr from the hyperparameters given to the constructor (so a resumed run may change them).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        a: float,
        b: float = -0.51,
        batch_size: float,
        lr_max: float,
        warmup_tokens: float,
        total_tokens: float | None = None,
        decay_tokens: float = 0,
        decay: str = "exponential",
        final_factor: float = 0.0,
        time_constant: float = EXP_TIME_CONSTANT,
        group_scales: Sequence[float] | None = None,
        tokens_seen: float = 0,
    ) -> None:
        self.power_kwargs = {
            "a": a, "b": b, "batch_size": batch_size, "lr_max": lr_max, "warmup_tokens": warmup_tokens,
            "total_tokens": total_tokens, "decay_tokens": decay_tokens, "decay": decay, "final_factor": final_factor,
            "time_constant": time_constant,
        }
        power_lr(0, **self.power_kwargs)  # validates every hyperparameter (ValueError naming it)
        n_groups = len(optimizer.param_groups)
        if group_scales is None:
            group_scales = [1.0] * n_groups
        if len(group_scales) != n_groups:
            raise ValueError(f"group_scales has {len(group_scales)} entries for {n_groups} param groups")
        self.group_scales = [_check_number(s, "group_scales", low=0.0) for s in group_scales]
        self.tokens_seen = _check_number(tokens_seen, "tokens_seen", low=0.0)
        super().__init__(optimizer)

    def current_lr(self) -> float:
        """eta(tokens_seen) before group scaling."""
        return power_lr(self.tokens_seen, **self.power_kwargs)

    def get_lr(self) -> list[float]:
        lr = self.current_lr()
        return [lr * s for s in self.group_scales]

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def add_tokens(self, n) -> None:
        """Counts ``n`` more tokens (number or 0-d tensor, >= 0) and applies the new lr immediately."""
        self.tokens_seen += _check_number(n.item() if isinstance(n, torch.Tensor) else n, "n", low=0.0)
        self._apply()

    def step(self, tokens_seen=None) -> None:
        """Advances the step counters; with ``tokens_seen`` first sets the absolute token count. Applies eta."""
        if tokens_seen is not None:
            v = tokens_seen.item() if isinstance(tokens_seen, torch.Tensor) else tokens_seen
            self.tokens_seen = _check_number(v, "tokens_seen", low=0.0)
        super().step()
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = [k for k in ("tokens_seen", "last_epoch", "_step_count") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict is not a TokenPowerScheduler state (missing {missing})")
        self.tokens_seen = _check_number(state_dict["tokens_seen"], "tokens_seen", low=0.0)
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict["_step_count"])
        self._apply()
