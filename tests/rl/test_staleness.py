"""Staleness of trained tokens: hand-computed cases and a naive loop."""

import pytest
import torch

from reasonrl.rl.staleness import oldest_versions, stale_rows, staleness_counts, staleness_summary


def test_hand_computed():
    versions = torch.tensor([[3, 3, 4, 0], [1, 2, 2, 2], [5, 5, 5, 5]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False], [False, False, False, False]])
    assert oldest_versions(versions, mask).tolist() == [3, 1, 4]  # padding ignored; an empty row gets the newest
    assert stale_rows(versions, mask, learner_version=4, max_staleness=1).tolist() == [False, True, False]
    counts = staleness_counts(versions, mask, learner_version=4)
    assert counts.tolist() == [1, 2, 1, 1]  # lags 1, 1, 0, 3, 2
    assert staleness_summary(counts) == {"async/staleness_mean": pytest.approx(7 / 5), "async/staleness_max": 3.0}
    assert staleness_summary(torch.zeros(2)) == {"async/staleness_mean": 0.0, "async/staleness_max": 0.0}


def test_a_token_newer_than_the_learner_is_an_error():
    with pytest.raises(ValueError, match="newer than the learner's 2"):
        staleness_counts(torch.tensor([[3]]), torch.tensor([[True]]), learner_version=2)


@pytest.mark.parametrize("seed", range(3))
def test_against_a_naive_loop(seed):
    g = torch.Generator().manual_seed(seed)
    versions = torch.randint(0, 6, (7, 9), generator=g)
    mask = torch.rand(7, 9, generator=g) > 0.4
    learner, k = 6, 2
    lags, oldest = [], []
    for i in range(7):
        mine = [int(versions[i, j]) for j in range(9) if mask[i, j]]
        lags += [learner - v for v in mine]
        oldest.append(min(mine) if mine else None)
    newest = max(int(v) for v in versions[mask])
    assert oldest_versions(versions, mask).tolist() == [newest if o is None else o for o in oldest]
    assert stale_rows(versions, mask, learner_version=learner, max_staleness=k).tolist() == [
        o is not None and learner - o > k for o in oldest]
    counts = staleness_counts(versions, mask, learner_version=learner)
    assert counts.tolist() == [lags.count(lag) for lag in range(max(lags) + 1)]
    summary = staleness_summary(counts)
    assert summary["async/staleness_mean"] == pytest.approx(sum(lags) / len(lags))
    assert summary["async/staleness_max"] == max(lags)
