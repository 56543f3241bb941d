import math

import pytest
import torch

from reasonrl.rl.importance import rollout_correction


def test_token_level_hand_computed():
    # deltas: row 0: ln 2, ln 0.5, (pad); row 1: ln 4 -> w = 2, 0.5 | 4 -> truncated at cap 3
    old = torch.tensor([[math.log(0.2), math.log(0.1), 0.0], [math.log(0.8), 0.0, 0.0]])
    rollout = torch.tensor([[math.log(0.1), math.log(0.2), 5.0], [math.log(0.2), 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    w, m = rollout_correction(old, rollout, mask, level="token", mode="truncate", cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 0.0], [3.0, 0.0, 0.0]]))
    assert m["sampling/logp_diff_max"].item() == pytest.approx(math.log(4))
    assert m["sampling/logp_diff_mean"].item() == pytest.approx((math.log(2) * 2 + math.log(4)) / 3)
    assert m["sampling/is_ratio_max"].item() == pytest.approx(4.0)  # before truncation
    assert m["sampling/is_ratio_min"].item() == pytest.approx(0.5)
    assert m["sampling/is_ratio_mean"].item() == pytest.approx(6.5 / 3)
    masked, _ = rollout_correction(old, rollout, mask, level="token", mode="mask", cap=3.0, floor=0.6)
    torch.testing.assert_close(masked, torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))


def test_sequence_level_is_the_product_of_token_ratios():
    # row 0: 2 * 0.5 = 1; row 1: 4
    old = torch.tensor([[math.log(0.2), math.log(0.1)], [math.log(0.8), 0.0]])
    rollout = torch.tensor([[math.log(0.1), math.log(0.2)], [math.log(0.2), 9.0]])
    mask = torch.tensor([[True, True], [True, False]])
    w, _ = rollout_correction(old, rollout, mask, level="sequence", mode="truncate", cap=10.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0], [4.0, 0.0]]))
    w, _ = rollout_correction(old, rollout, mask, level="sequence", mode="mask", cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_naive_loop_and_identity():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 6, generator=g) * 3
    rollout = old + 0.3 * torch.randn(4, 6, generator=g)
    rollout[0] += 5.0  # sequence-level exponent -30: beyond the clamp at -20
    mask = torch.arange(6)[None] < torch.tensor([6, 2, 4, 1])[:, None]
    for level in ("token", "sequence"):
        w, _ = rollout_correction(old, rollout, mask, level=level, mode="truncate", cap=1.5)
        for i in range(4):
            seq = sum(float(old[i, t] - rollout[i, t]) for t in range(6) if mask[i, t])
            for t in range(6):
                d = float(old[i, t] - rollout[i, t]) if level == "token" else seq
                expected = min(math.exp(max(-20.0, min(20.0, d))), 1.5) if mask[i, t] else 0.0
                assert float(w[i, t]) == pytest.approx(expected, rel=1e-6, abs=1e-7)
    same, metrics = rollout_correction(old, old.clone(), mask)
    assert torch.equal(same, mask.float()) and metrics["sampling/logp_diff_max"] == 0


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_huge_log_ratios_are_clamped(mode):
    # sequence level, sum of deltas 3 * 300 = 900: exp(900) is inf even in float64. The exponent is clamped to
    # [-20, 20]: w = min(e^20, cap) = cap ("truncate") or 0 ("mask", e^20 > cap); -900 -> e^-20 (kept by "mask"
    # with floor 0). Metrics stay finite: is_ratio_max = e^20, is_ratio_min = e^-20.
    old = torch.tensor([[300.0, 300.0, 300.0], [-300.0, -300.0, -300.0]])
    rollout, mask = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    w, m = rollout_correction(old, rollout, mask, level="sequence", mode=mode, cap=2.0)
    top = 2.0 if mode == "truncate" else 0.0
    torch.testing.assert_close(w, torch.tensor([[top] * 3, [math.exp(-20)] * 3]))
    assert all(torch.isfinite(v) for v in m.values())
    assert m["sampling/is_ratio_max"].item() == pytest.approx(math.exp(20))
    assert m["sampling/is_ratio_min"].item() == pytest.approx(math.exp(-20))
    assert m["sampling/logp_diff_max"].item() == pytest.approx(300.0)  # |delta| itself is not clamped
    wt, mt = rollout_correction(old, rollout, mask, level="token", mode=mode, cap=2.0)
    torch.testing.assert_close(wt, w)
    assert all(torch.isfinite(v) for v in mt.values())


def test_bad_arguments():
    x, mask = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    for kwargs, match in (({"level": "row"}, "level"), ({"mode": "clip"}, "mode"), ({"cap": 0.5}, "cap"),
                          ({"floor": 2.0}, "floor")):
        with pytest.raises(ValueError, match=match):
            rollout_correction(x, x, mask, **kwargs)
    with pytest.raises(ValueError, match="same"):
        rollout_correction(x, torch.zeros(2, 2), mask)
