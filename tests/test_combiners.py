"""Combiners: golden values on hand-made member log-probabilities (no model)."""

import numpy as np
import pytest

from transferlab import combiners


def logp(rows):
    """Member log-probs (M, N, K) from probability rows."""
    return np.log(np.array(rows, dtype=np.float64))


def test_soft_is_the_mean_probability():
    lp = logp([[[0.6, 0.4]], [[0.2, 0.8]]])
    np.testing.assert_allclose(np.exp(combiners.combine_soft(lp)), [[0.4, 0.6]])


def test_logit_is_the_renormalised_geometric_mean():
    lp = logp([[[0.9, 0.1]], [[0.1, 0.9]]])
    np.testing.assert_allclose(np.exp(combiners.combine_logit(lp)), [[0.5, 0.5]])


def test_hard_votes_and_breaks_ties_by_summed_probability():
    lp = logp([[[0.6, 0.3, 0.1]], [[0.1, 0.5, 0.4]], [[0.55, 0.4499, 0.0001]]])
    assert combiners.combine_hard(lp).argmax(1).tolist() == [0]  # two votes for class 0
    tie = logp([[[0.51, 0.49]], [[0.02, 0.98]]])  # one vote each; class 1 has more mass
    assert combiners.combine_hard(tie).argmax(1).tolist() == [1]
    np.testing.assert_allclose(np.exp(combiners.combine_hard(lp)).sum(1), 1.0)


def test_weighted_fits_weights_that_prefer_the_good_member_and_never_on_test():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 200)
    good = np.full((200, 3), 0.1)
    good[np.arange(200), targets] = 0.8
    bad = rng.dirichlet(np.ones(3), 200)
    lp = np.log(np.stack([bad, good]))
    w = combiners.fit_weights(lp, targets, "val")
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all() and w[1] > 0.9
    with pytest.raises(ValueError, match="test split"):
        combiners.fit_weights(lp, targets, "test")


def _members(seed=0, n=300, k=3):
    """Targets and three members: a good one, a copy of it, and noise."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, k, n)
    good = np.full((n, k), 0.1)
    good[np.arange(n), targets] = 1 - 0.1 * (k - 1)
    bad = rng.dirichlet(np.ones(k), n)
    return targets, np.log(np.stack([bad, good, good]))


def test_select_picks_the_good_member_with_replacement_and_never_on_test():
    targets, lp = _members()
    w = combiners.fit_select(lp, targets, "val")
    assert w.sum() == pytest.approx(1.0) and w[0] == 0.0 and w[1] + w[2] == 1.0


def test_select_adds_a_member_only_when_it_lowers_the_nll():
    # member 0 is sure and right on the first half and wrong on the second, member 1 the
    # reverse: their mean has a lower NLL than either, so selection takes one of each
    targets = np.array([0, 0, 1, 1])
    p0 = np.array([[0.99, 0.01], [0.99, 0.01], [0.8, 0.2], [0.8, 0.2]])
    p1 = np.array([[0.2, 0.8], [0.2, 0.8], [0.01, 0.99], [0.01, 0.99]])
    w = combiners.fit_select(np.log(np.stack([p0, p1])), targets, "val")
    np.testing.assert_allclose(w, [0.5, 0.5])


def test_stacking_learns_to_undo_a_member_that_swaps_two_classes():
    """Known answer: a member whose columns 0 and 1 are swapped is useless to averaging, but
    a stacker reads it correctly and reaches its accuracy."""
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, 600)
    p = np.full((600, 3), 0.05)
    p[np.arange(600), targets] = 0.9
    swapped = p[:, [1, 0, 2]]
    lp = np.log(np.stack([swapped, rng.dirichlet(np.ones(3), 600)]))
    params = combiners.fit_stacking(lp[:, :300], targets[:300], "val")
    stacked = combiners.combine_stacking(lp[:, 300:], params)
    assert (stacked.argmax(1) == targets[300:]).mean() == 1.0
    assert (combiners.combine_soft(lp[:, 300:]).argmax(1) == targets[300:]).mean() < 0.5
    np.testing.assert_allclose(np.exp(stacked).sum(1), 1.0)


@pytest.mark.parametrize("method", sorted(combiners.FITTED))
def test_nothing_is_ever_fitted_on_the_test_split(method):
    targets, lp = _members()
    with pytest.raises(ValueError, match="test split"):
        combiners.fit(method, lp, targets, "test")


def test_accounting_known_answer():
    targets = np.array([0, 1, 2, 0])
    pred = [[0, 1, 0, 1], [0, 2, 2, 1]]  # member top-1: 50%, 50%; oracle 75%
    lp = np.log(np.stack([np.eye(3)[p] * 0.97 + 0.01 for p in pred]))
    combined = np.log(np.eye(3)[[0, 1, 2, 1]] * 0.97 + 0.01)  # 75%
    acc = combiners.accounting(lp, combined, targets)
    assert acc["gain_over_best_member"] == pytest.approx(0.25)
    assert acc["gain_over_mean_member"] == pytest.approx(0.25)
    assert acc["oracle_top1"] == 0.75 and acc["disagreement"] == 0.5
