import itertools
import math

import pytest
import torch

from reasonrl.trainers.lr_schedules import (
    DECAY_SHAPES,
    EXP_TIME_CONSTANT,
    TokenPowerScheduler,
    decay_factor,
    power_lr,
    solve_power_a,
    wsd_lr_factor,
)

# a=1, b=-1/2, beta=1, lr_max=1: eta_pow(n) = 1/sqrt(n); warmup 100 tokens -> eta_pow(100) = 0.1
SIMPLE = {"a": 1.0, "b": -0.5, "batch_size": 1, "lr_max": 1.0, "warmup_tokens": 100}


def test_doc_sanity_value():
    # 1024 * 4.6 = 4710.4; (1e11)^-0.51 = 10^-5.61 = 2.45471e-6 -> 0.0115627 (~1.2e-2 < 0.02)
    lr = power_lr(1e11, a=4.6, b=-0.51, batch_size=1024, lr_max=0.02, warmup_tokens=0)
    assert lr == pytest.approx(0.0115627, rel=1e-5)
    assert lr == pytest.approx(1024 * 4.6 * 10**-5.61, rel=1e-12)


def test_batch_size_linear_until_cap():
    kw = {"a": 4.6, "b": -0.51, "lr_max": 0.02, "warmup_tokens": 0}
    assert power_lr(1e11, batch_size=512, **kw) == pytest.approx(0.0115627 / 2, rel=1e-5)
    assert power_lr(1e11, batch_size=2048, **kw) == 0.02  # 0.0231 capped


def test_hand_power_and_warmup():
    assert power_lr(0, **SIMPLE) == 0.0
    assert power_lr(50, **SIMPLE) == pytest.approx(0.05)  # 50/100 * 0.1
    assert power_lr(100, **SIMPLE) == pytest.approx(0.1)
    assert power_lr(400, **SIMPLE) == pytest.approx(0.05)  # 1/20
    assert power_lr(10_000, **SIMPLE) == pytest.approx(0.01)
    # continuity at the end of the warmup
    assert power_lr(100 - 1e-9, **SIMPLE) == pytest.approx(power_lr(100, **SIMPLE), rel=1e-9)


def test_cap_at_lr_max():
    kw = dict(SIMPLE, lr_max=0.02)
    # 1/sqrt(n) > 0.02 until n = 2500: capped, warmup rises to the cap
    assert power_lr(50, **kw) == pytest.approx(0.01)  # 50/100 * min(.02, .1)
    assert power_lr(1000, **kw) == 0.02
    assert power_lr(2500, **kw) == pytest.approx(0.02)
    assert power_lr(10_000, **kw) == pytest.approx(0.01)
    # no warmup: n = 0 is the limit n -> 0+, i.e. the cap
    assert power_lr(0, **dict(kw, warmup_tokens=0)) == 0.02
    # b = 0: constant min(lr_max, beta * a)
    assert power_lr(0, **dict(kw, b=0.0, a=0.01, warmup_tokens=0)) == pytest.approx(0.01)


# decay over the last 2000 of 10000 tokens: starts at eta_pow(8000) = 1/sqrt(8000) = 0.0111803
DEC = dict(SIMPLE, total_tokens=10_000, decay_tokens=2_000)
START = 8000**-0.5


@pytest.mark.parametrize(
    ("decay", "ff", "mid", "quarter"),
    [
        # linear: 1 - (1-f) x
        ("linear", 0.0, 0.5, 0.75),
        ("linear", 0.1, 0.55, 0.775),
        # cosine: f + (1-f)(1+cos(pi x))/2; (1+cos(pi/4))/2 = .8535534
        ("cosine", 0.0, 0.5, 0.8535534),
        ("cosine", 0.1, 0.55, 0.1 + 0.9 * 0.8535534),
        # exponential, T=1: A = (1-f)/(1-e^-1) = 1.5819767 (1-f), B = 1-A;
        #   f=0: x=.5 -> 1.5819767*e^-.5 - .5819767 = .9595173 - .5819767 = .3775407
        #        x=.25 -> 1.5819767*e^-.25 - .5819767 = 1.2320447 - .5819767 = .6500680
        #   f=.1: A = 1.4237790, x=.5 -> 1.4237790*.6065307 - .4237790 = .4397866
        ("exponential", 0.0, 0.3775407, 0.6500680),
        ("exponential", 0.1, 0.4397866, 0.6850612),
    ],
)
def test_decay_shapes_hand(decay, ff, mid, quarter):
    kw = dict(DEC, decay=decay, final_factor=ff)
    assert power_lr(7999, **kw) == pytest.approx(7999**-0.5)  # still in the power region
    assert power_lr(8000, **kw) == pytest.approx(START)  # g(0) = 1
    assert power_lr(8500, **kw) == pytest.approx(START * quarter, rel=1e-6)
    assert power_lr(9000, **kw) == pytest.approx(START * mid, rel=1e-6)
    assert power_lr(10_000, **kw) == pytest.approx(START * ff, abs=1e-15)  # g(1) = final_factor
    assert power_lr(50_000, **kw) == pytest.approx(START * ff, abs=1e-15)  # held afterwards
    assert decay_factor(0.5, decay=decay, final_factor=ff) == pytest.approx(mid, rel=1e-6)


@pytest.mark.parametrize("decay", DECAY_SHAPES)
def test_decay_monotone(decay):
    vals = [decay_factor(x / 50, decay=decay, final_factor=0.05) for x in range(51)]
    assert vals[0] == pytest.approx(1.0) and vals[-1] == pytest.approx(0.05)
    assert all(b <= a + 1e-15 for a, b in itertools.pairwise(vals))


def test_exponential_time_constant():
    assert EXP_TIME_CONSTANT == 1.0
    # sharper T=0.2: A = 1/(1-e^-5) = 1.0067837; x=.5 -> 1.0067837*.0820850 - .0067837 = .0826418 - .0067837 = .0758582
    assert decay_factor(0.5, decay="exponential", time_constant=0.2) == pytest.approx(0.0758582, rel=1e-6)
    # T -> large approaches linear
    assert decay_factor(0.5, decay="exponential", time_constant=1e4) == pytest.approx(0.5, abs=1e-4)


def test_decay_inside_capped_region_and_from_warmup_end():
    # decay starting right at the end of the warmup uses eta_pow(N_w)
    kw = dict(SIMPLE, total_tokens=300, decay_tokens=200, decay="linear")
    assert power_lr(100, **kw) == pytest.approx(0.1)
    assert power_lr(200, **kw) == pytest.approx(0.05)


def test_solve_power_a_round_trip():
    a = solve_power_a(1e-6, at_tokens=1e8, b=-0.51, batch_size=64)
    assert a == pytest.approx(1e-6 / (64 * 1e8**-0.51))
    lr = power_lr(1e8, a=a, b=-0.51, batch_size=64, lr_max=1.0, warmup_tokens=1e6)
    assert lr == pytest.approx(1e-6, rel=1e-12)
    # the doc's a: 0.0115627 at 1e11 with beta=1024 gives back 4.6
    assert solve_power_a(1024 * 4.6 * 1e11**-0.51, at_tokens=1e11, b=-0.51, batch_size=1024) == pytest.approx(4.6)


def test_power_lr_errors():
    with pytest.raises(ValueError, match="tokens_seen"):
        power_lr(-1, **SIMPLE)
    with pytest.raises(ValueError, match="tokens_seen"):
        power_lr(float("nan"), **SIMPLE)
    with pytest.raises(ValueError, match="^a must"):
        power_lr(1, **dict(SIMPLE, a=0))
    with pytest.raises(ValueError, match="^b must"):
        power_lr(1, **dict(SIMPLE, b=0.5))
    with pytest.raises(ValueError, match="batch_size"):
        power_lr(1, **dict(SIMPLE, batch_size=0))
    with pytest.raises(ValueError, match="lr_max"):
        power_lr(1, **dict(SIMPLE, lr_max=-1))
    with pytest.raises(ValueError, match="warmup_tokens"):
        power_lr(1, **dict(SIMPLE, warmup_tokens=-5))
    with pytest.raises(ValueError, match="decay"):
        power_lr(1, **dict(DEC, decay="step"))
    with pytest.raises(ValueError, match="final_factor"):
        power_lr(1, **dict(DEC, final_factor=1.5))
    with pytest.raises(ValueError, match="needs total_tokens"):
        power_lr(1, **dict(SIMPLE, decay_tokens=10))
    with pytest.raises(ValueError, match="total_tokens"):
        power_lr(1, **dict(SIMPLE, total_tokens=50, decay_tokens=60))
    with pytest.raises(ValueError, match="overlaps the warmup"):
        power_lr(1, **dict(SIMPLE, total_tokens=150, decay_tokens=60))
    with pytest.raises(ValueError, match="a must be a number"):
        power_lr(1, **dict(SIMPLE, a="x"))
    with pytest.raises(ValueError, match="time_constant"):
        power_lr(9000, **dict(DEC, time_constant=0))
    for kw, name in [({"target_lr": 0}, "target_lr"), ({"at_tokens": 0}, "at_tokens"), ({"b": 1}, "b"),
                     ({"batch_size": -1}, "batch_size")]:
        args = dict({"target_lr": 1e-6, "at_tokens": 1e6, "b": -0.5, "batch_size": 8}, **kw)
        with pytest.raises(ValueError, match=name):
            solve_power_a(args.pop("target_lr"), **args)


# ------------------------------------------------------------------------------------------ WSD by steps
def test_wsd_hand():
    kw = {"warmup_steps": 10, "total_steps": 100, "decay_steps": 20, "decay": "linear"}
    assert wsd_lr_factor(0, **kw) == pytest.approx(0.1)  # (0+1)/10
    assert wsd_lr_factor(9, **kw) == pytest.approx(1.0)
    assert wsd_lr_factor(50, **kw) == 1.0
    assert wsd_lr_factor(80, **kw) == pytest.approx(1.0)  # decay start: g(0)
    assert wsd_lr_factor(90, **kw) == pytest.approx(0.5)
    assert wsd_lr_factor(99, **kw) == pytest.approx(0.05)  # last trained step, one increment above 0
    assert wsd_lr_factor(100, **kw) == pytest.approx(0.0)
    assert wsd_lr_factor(120, **dict(kw, final_factor=0.1)) == pytest.approx(0.1)
    assert wsd_lr_factor(90, **dict(kw, decay="exponential")) == pytest.approx(0.3775407, rel=1e-6)
    assert wsd_lr_factor(90, **dict(kw, decay="cosine")) == pytest.approx(0.5)
    # no warmup, no decay: constant
    assert wsd_lr_factor(5, warmup_steps=0, total_steps=10, decay_steps=0) == 1.0


def test_wsd_errors():
    with pytest.raises(ValueError, match="warmup_steps"):
        wsd_lr_factor(0, warmup_steps=-1, total_steps=10, decay_steps=0)
    with pytest.raises(ValueError, match="total_steps"):
        wsd_lr_factor(0, warmup_steps=0, total_steps=0, decay_steps=0)
    with pytest.raises(ValueError, match="decay_steps"):
        wsd_lr_factor(0, warmup_steps=0, total_steps=10, decay_steps=1.5)
    with pytest.raises(ValueError, match="warmup_steps \\+ decay_steps"):
        wsd_lr_factor(0, warmup_steps=6, total_steps=10, decay_steps=5)
    with pytest.raises(ValueError, match="decay"):
        wsd_lr_factor(0, warmup_steps=0, total_steps=10, decay_steps=5, decay="poly")
    with pytest.raises(ValueError, match="^step"):
        wsd_lr_factor(-1, warmup_steps=0, total_steps=10, decay_steps=5)
    with pytest.raises(ValueError, match="final_factor"):
        wsd_lr_factor(0, warmup_steps=0, total_steps=10, decay_steps=5, final_factor=-0.1)


# ------------------------------------------------------------------------------------------ TokenPowerScheduler
def _opt(groups=1, lr=123.0):
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def _lrs(opt):
    return [g["lr"] for g in opt.param_groups]


def test_scheduler_add_tokens_then_step():
    opt = _opt()
    sched = TokenPowerScheduler(opt, **SIMPLE)
    assert sched.tokens_seen == 0 and sched.get_last_lr() == [0.0] and _lrs(opt) == [0.0]  # eta(0), base lr ignored
    sched.add_tokens(50)  # before optimizer.step(): this step runs at eta(50) = 0.05
    assert _lrs(opt) == [pytest.approx(0.05)] and sched.get_last_lr() == [pytest.approx(0.05)]
    opt.step()
    for _ in range(3):  # repeated step() (accelerate: num_processes calls) changes nothing
        sched.step()
    assert _lrs(opt) == [pytest.approx(0.05)] and sched.tokens_seen == 50
    sched.add_tokens(torch.tensor(350.0))
    assert sched.get_last_lr() == [pytest.approx(0.05)]  # eta(400) = 1/20


def test_scheduler_absolute_tokens_in_step():
    opt = _opt()
    sched = TokenPowerScheduler(opt, **SIMPLE)
    opt.step()
    sched.step(tokens_seen=400)
    sched.step(tokens_seen=400)  # idempotent
    assert sched.tokens_seen == 400 and sched.get_last_lr() == [pytest.approx(0.05)]
    sched.step(tokens_seen=torch.tensor(10_000))
    assert _lrs(opt) == [pytest.approx(0.01)]
    with pytest.raises(ValueError, match="tokens_seen"):
        sched.step(tokens_seen=-1)
    with pytest.raises(ValueError, match="^n must"):
        sched.add_tokens(-3)


def test_scheduler_group_scales_and_decay():
    opt = _opt(groups=2)
    sched = TokenPowerScheduler(opt, **DEC, decay="linear", group_scales=[1.0, 0.5], tokens_seen=9000)
    assert sched.get_last_lr() == [pytest.approx(START * 0.5), pytest.approx(START * 0.25)]
    assert sched.current_lr() == pytest.approx(START * 0.5)
    with pytest.raises(ValueError, match="group_scales"):
        TokenPowerScheduler(_opt(groups=2), **SIMPLE, group_scales=[1.0])
    with pytest.raises(ValueError, match="warmup_tokens"):
        TokenPowerScheduler(_opt(), **dict(SIMPLE, warmup_tokens=-1))


def test_scheduler_state_round_trip(tmp_path):
    opt = _opt()
    sched = TokenPowerScheduler(opt, **DEC)
    for n in (40, 60, 300, 7700, 900):
        sched.add_tokens(n)
        opt.step()
        sched.step()
    assert sched.tokens_seen == 9000
    path = tmp_path / "state.pt"
    torch.save({"scheduler": sched.state_dict(), "optimizer": opt.state_dict()}, path)
    state = torch.load(path, weights_only=True)  # plain numbers only

    opt2 = _opt()
    sched2 = TokenPowerScheduler(opt2, **DEC)
    opt2.load_state_dict(state["optimizer"])  # as grpo._restore: optimizer first, then scheduler
    sched2.load_state_dict(state["scheduler"])
    assert sched2.tokens_seen == 9000 and sched2.last_epoch == sched.last_epoch
    assert sched2._step_count == sched._step_count
    assert sched2.get_last_lr() == sched.get_last_lr() == _lrs(opt2)
    assert sched2.get_last_lr()[0] == pytest.approx(power_lr(9000, **DEC))
    sched2.add_tokens(500)
    sched.add_tokens(500)
    assert sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="tokens_seen"):
        sched2.load_state_dict({"last_epoch": 0, "_step_count": 1, "_last_lr": [0.1]})  # e.g. a LambdaLR state


def test_scheduler_under_accelerate():
    from accelerate import Accelerator
    from accelerate.scheduler import AcceleratedScheduler

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = TokenPowerScheduler(opt, **SIMPLE)
    model, opt, wrapped = acc.prepare(model, opt, sched)
    assert isinstance(wrapped, AcceleratedScheduler)
    raw = getattr(wrapped, "scheduler", wrapped)
    assert raw is sched
    loss = model(torch.ones(1, 2)).sum()
    acc.backward(loss)
    raw.add_tokens(50)
    assert wrapped.get_last_lr() == [pytest.approx(0.05)]
    opt.step()
    wrapped.step()
    assert wrapped.get_last_lr() == [pytest.approx(0.05)] and math.isclose(sched.tokens_seen, 50)
    wrapped.step(tokens_seen=400)  # kwargs go through the wrapper
    assert wrapped.get_last_lr() == [pytest.approx(0.05)] and sched.tokens_seen == 400
    assert wrapped.state_dict()["tokens_seen"] == 400
