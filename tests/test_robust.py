"""Robust aggregation: median, trimmed mean, Krum, self-centred clipping and their registry."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from p2pfl.core.aggregators import (
    GOSSIP_AGGREGATORS,
    SERVER_AGGREGATORS,
    adaptive_tau,
    coordinate_median,
    gossip_aggregator,
    krum,
    self_centred_clip,
    server_aggregator,
    trimmed_mean,
)
from p2pfl.core.mixing import fedavg_step, gossip_step

PROPERTY = settings(max_examples=150, deadline=None, database=None)

_small = st.floats(-10, 10, width=32)
_HUGE = float(np.float32(1e29))
_huge = st.floats(-_HUGE, _HUGE, width=32)  # finite, below the 1e30 the module promises
_moderate = st.floats(-1e6, 1e6, width=32)
_outlier = st.one_of(st.sampled_from([1e6, -1e6]), _huge)


def _rows(n: int, d: int, elements: st.SearchStrategy) -> st.SearchStrategy:
    return hnp.arrays(np.float32, (n, d), elements=elements)


@st.composite
def _honest_with_outliers(draw):
    """(honest rows, the whole stack shuffled, number of outliers) with outliers < honest."""
    d = draw(st.integers(1, 6))
    honest_n = draw(st.integers(1, 7))
    f = draw(st.integers(0, honest_n - 1))
    honest = draw(_rows(honest_n, d, _small))
    outliers = draw(_rows(f, d, _outlier))
    stack = np.concatenate([honest, outliers])
    order = draw(st.permutations(range(len(stack))))
    return honest, stack[list(order)], f


def gossip_aggregate(name, own, received, weights, **settings):
    """The registry's gossip rule for `name`, applied once: its new model."""
    return gossip_aggregator(name, **settings)(own, received, weights).params


def server_aggregate(name, updates, weights, **settings):
    """The registry's server rule for `name`, applied once."""
    return server_aggregator(name, **settings)(updates, weights)


def _check_output(out, d: int) -> None:
    out = np.asarray(out)
    assert out.dtype == np.float32
    assert out.shape == (d,)
    assert np.isfinite(out).all()


# --- median and trimmed mean ----------------------------------------------------------------


@PROPERTY
@given(_honest_with_outliers())
def test_median_stays_within_the_honest_range(case):
    """With fewer outliers than honest rows, the median lies within the honest range."""
    honest, stack, _ = case
    out = coordinate_median(stack)
    assert (honest.min(axis=0) <= out).all() and (out <= honest.max(axis=0)).all()


@PROPERTY
@given(_honest_with_outliers())
def test_trimmed_mean_with_trim_f_stays_within_the_honest_range(case):
    """Trimming at least as many values as there are outliers keeps the honest range."""
    honest, stack, f = case
    out = trimmed_mean(stack, f)
    assert (honest.min(axis=0) <= out).all() and (out <= honest.max(axis=0)).all()


def test_outliers_of_a_million_do_not_move_median_or_trimmed_mean():
    """Two rows of 1e6 among five honest rows near 1 leave both results near 1."""
    rng = np.random.default_rng(0)
    honest = (1 + 0.01 * rng.standard_normal((5, 4))).astype(np.float32)
    stack = np.concatenate([honest, np.full((2, 4), 1e6, np.float32)])
    for out in (coordinate_median(stack), trimmed_mean(stack, 2)):
        np.testing.assert_allclose(out, 1.0, atol=0.05)
    assert (np.mean(stack, axis=0) > 1e5).all()  # the plain mean does move


@PROPERTY
@given(st.integers(1, 8).flatmap(lambda n: _rows(n, 5, _huge)))
def test_trimmed_mean_without_trim_is_the_mean(stack):
    """trim = 0 is the plain (float64) mean, rounded to float32."""
    expected = stack.astype(np.float64).mean(axis=0).astype(np.float32)
    np.testing.assert_allclose(trimmed_mean(stack, 0), expected, rtol=1e-6)


@PROPERTY
@given(st.integers(0, 4).flatmap(lambda h: _rows(2 * h + 1, 6, _huge)))
def test_median_of_an_odd_stack_is_one_of_the_values(stack):
    """For odd n the median of each coordinate is one of that coordinate's values, exactly."""
    out = coordinate_median(stack)
    assert (stack == out).any(axis=0).all()


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    """A hand-computed case: each coordinate drops its own largest and smallest value."""
    stack = np.array([[1, 50], [2, -7], [3, 6], [100, 5]], np.float32)
    np.testing.assert_array_equal(trimmed_mean(stack, 1), [2.5, 5.5])


# --- Krum -----------------------------------------------------------------------------------


@st.composite
def _krum_case(draw):
    """(honest rows, shuffled stack, f) with n >= 2f + 3 and outliers far from the honest."""
    d = draw(st.integers(1, 5))
    f = draw(st.integers(0, 4))
    honest_n = draw(st.integers(f + 3, f + 7))  # n = honest + f >= 2f + 3
    honest = draw(_rows(honest_n, d, st.floats(-1, 1, width=32)))
    magnitude = draw(_rows(f, d, st.floats(1e4, 1e6, width=32)))
    sign = draw(_rows(f, d, st.sampled_from([-1.0, 1.0])))
    outliers = magnitude * sign
    if draw(st.booleans()) and f:  # colluding: all outliers send the same model
        outliers[:] = outliers[0]
    stack = np.concatenate([honest, outliers])
    order = draw(st.permutations(range(len(stack))))
    return honest, stack[list(order)], f


@PROPERTY
@given(_krum_case())
def test_krum_never_selects_a_planted_outlier(case):
    """With f < n/2 - 1 far outliers (scattered or colluding), Krum returns an honest row."""
    honest, stack, f = case
    out = krum(stack, f)
    assert any(np.array_equal(out, row) for row in honest)


@PROPERTY
@given(st.integers(3, 8).flatmap(lambda n: _rows(n, 4, _huge)))
def test_multi_krum_of_everything_is_the_mean(stack):
    """m = n - f with f = 0 selects every row: the plain mean."""
    expected = stack.astype(np.float64).mean(axis=0).astype(np.float32)
    scale = float(np.abs(stack).max(initial=0.0))  # the sum's order differs: allow cancellation
    np.testing.assert_allclose(
        krum(stack, 0, m=len(stack)), expected, rtol=1e-6, atol=1e-12 * scale
    )


def test_krum_scores_by_the_nearest_neighbours_only():
    """A hand-computed case on a line: the row in the tight cluster's middle wins."""
    stack = np.array([[0.0], [1.0], [2.0], [10.0], [30.0]], np.float32)
    # f = 1: each row sums its n - f - 2 = 2 nearest squared distances; row 1 scores 1 + 1
    assert krum(stack, 1)[0] == 1.0
    np.testing.assert_allclose(krum(stack, 1, m=3), [1.0])  # rows 0, 1, 2 score 5, 2, 5


# --- self-centred clipping ------------------------------------------------------------------


@st.composite
def _clip_case(draw, elements: st.SearchStrategy = _moderate):
    d = draw(st.integers(1, 6))
    k = draw(st.integers(0, 5))
    own = draw(hnp.arrays(np.float32, (d,), elements=elements))
    received = draw(_rows(k, d, elements))
    weights = draw(hnp.arrays(np.float64, (k,), elements=st.floats(0, 1)))
    tau = draw(st.floats(1e-3, 1e3))
    return own, received, weights, tau


@PROPERTY
@given(_clip_case())
def test_clipping_moves_own_by_at_most_tau_times_the_weights(case):
    """||result - own|| <= tau * sum(w), up to the float32 rounding of the result."""
    own, received, weights, tau = case
    out = self_centred_clip(own, received, weights, tau)
    moved = np.linalg.norm(out.astype(np.float64) - own)
    rounding = np.linalg.norm(np.spacing(np.abs(out)).astype(np.float64))
    assert moved <= tau * weights.sum() * (1 + 1e-9) + rounding


@PROPERTY
@given(_clip_case(st.floats(-1e3, 1e3, width=32)))
def test_clipping_with_a_huge_tau_is_the_plain_mix(case):
    """With tau above every distance nothing is clipped: own + sum_j w_j (x_j - own)."""
    own, received, weights, _ = case
    out = self_centred_clip(own, received, weights, 1e30)
    base = own.astype(np.float64)
    expected = base + weights @ (received.astype(np.float64) - base)
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_clipping_with_a_huge_tau_agrees_with_gossip_step():
    """Unclipped, self-centred clipping is gossip_step's weighted average."""
    rng = np.random.default_rng(1)
    own = rng.standard_normal(50).astype(np.float32)
    received = rng.standard_normal((3, 50)).astype(np.float32)
    weights = np.array([0.25, 0.25, 0.2])
    expected = gossip_step(own, received, weights.astype(np.float32)).params
    out = self_centred_clip(own, received, weights, 1e30)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_clipping_caps_each_neighbours_pull_at_tau():
    """A far neighbour pulls by exactly w * tau along its direction; a near one is not clipped."""
    own = np.zeros(2, np.float32)
    received = np.array([[300.0, 400.0], [0.1, 0.0]], np.float32)  # norms 500 and 0.1
    out = self_centred_clip(own, received, np.array([0.5, 0.5]), tau=1.0)
    np.testing.assert_allclose(out, [0.5 * 0.6 + 0.05, 0.5 * 0.8], rtol=1e-6)


def test_clipping_drops_a_neighbour_beyond_drop_times_tau():
    """With drop = 2: a neighbour at 500 (> 2 tau) pulls nothing, one at 1.5 is clipped to
    tau, one at 0.1 is taken whole."""
    own = np.zeros(2, np.float32)
    received = np.array([[300.0, 400.0], [1.5, 0.0], [0.0, 0.1]], np.float32)
    out = self_centred_clip(own, received, np.full(3, 0.25), tau=1.0, drop=2.0)
    np.testing.assert_allclose(out, [0.25 * 1.0, 0.25 * 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="drop must be"):
        self_centred_clip(own, received, np.full(3, 0.25), tau=1.0, drop=0.5)


def test_clipping_with_no_neighbours_returns_own():
    """k = 0: nothing received, the peer keeps its own model, as float32."""
    own = np.array([1.5, -2.0, 3.25], np.float32)
    out = self_centred_clip(own, np.empty((0, 3), np.float32), np.empty(0), tau=0.5)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, own)


# --- outputs and argument errors ------------------------------------------------------------

_REDUCERS = {
    "median": coordinate_median,
    "trimmed_mean": lambda x: trimmed_mean(x, (len(x) - 1) // 2),
    "krum": lambda x: krum(x, (len(x) - 3) // 2),
    "multi_krum": lambda x: krum(x, 0, m=len(x)),
    "clipping": lambda x: self_centred_clip(x[0], x[1:], np.full(len(x) - 1, 0.5), 1e29),
}


@PROPERTY
@given(
    st.sampled_from(sorted(_REDUCERS)),
    st.tuples(st.integers(3, 7), st.integers(1, 5)).flatmap(lambda s: _rows(*s, _huge)),
)
def test_outputs_are_finite_float32_vectors(name, stack):
    """Every rule returns a finite float32 [d] for finite inputs below 1e30 in magnitude."""
    _check_output(_REDUCERS[name](stack), stack.shape[1])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: coordinate_median(np.zeros(3)), r"\[n, d\]"),
        (lambda: coordinate_median(np.zeros((0, 3))), "non-empty"),
        (lambda: trimmed_mean(np.zeros((4, 2)), 2), r"n > 2 \* trim"),
        (lambda: trimmed_mean(np.zeros((4, 2)), -1), "trim must be a non-negative integer"),
        (lambda: krum(np.zeros((4, 2)), 1), r"n >= 2f \+ 3"),
        (lambda: krum(np.zeros((5, 2)), 1, m=5), "m <= n - f"),
        (lambda: krum(np.zeros((5, 2)), 1, m=0), "1 <= m"),
        (lambda: krum(np.zeros((5, 2)), -1), "f must be a non-negative integer"),
        (lambda: self_centred_clip(np.zeros(2), np.zeros((1, 2)), np.ones(1), 0.0), "tau"),
        (lambda: self_centred_clip(np.zeros(2), np.zeros((1, 2)), np.ones(1), -1.0), "tau"),
        (lambda: self_centred_clip(np.zeros(2), np.zeros((1, 2)), np.ones(1), np.nan), "tau"),
        (lambda: self_centred_clip(np.zeros(2), np.zeros((2, 2)), np.ones(1), 1.0), "length 2"),
        (lambda: self_centred_clip(np.zeros(2), np.zeros((1, 2)), -np.ones(1), 1.0), "negative"),
        (lambda: self_centred_clip(np.zeros((1, 2)), np.zeros((1, 2)), np.ones(1), 1.0), "own"),
        (lambda: self_centred_clip(np.zeros(2), np.zeros((1, 3)), np.ones(1), 1.0), "received"),
        (lambda: self_centred_clip(np.zeros(2), np.full((1, 2), 3e38), [10.0], 1e38), "overflow"),
        (lambda: server_aggregate("mean", np.ones((2, 2)), np.zeros(2), trim=0, f=0), "sum"),
        (lambda: server_aggregate("krum", np.ones((3, 2)), np.ones(2), trim=0, f=0), "length 3"),
        (
            lambda: gossip_aggregate("median", np.ones(2), np.ones((1, 3)), [1.0], trim=0, tau=1),
            "neighbours",
        ),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_problem(call, match):
    """Wrong shapes, too few models, tau <= 0 and bad weights raise a ValueError that says so."""
    with pytest.raises(ValueError, match=match):
        call()


# --- registry -------------------------------------------------------------------------------


@pytest.fixture
def stack():
    rng = np.random.default_rng(2)
    return rng.standard_normal((5, 7)).astype(np.float32)


@pytest.mark.parametrize("name", GOSSIP_AGGREGATORS)
def test_every_gossip_aggregator_runs(name, stack):
    """Each gossip rule aggregates own plus four received into a float32 [d]."""
    out = gossip_aggregate(name, stack[0], stack[1:], np.full(4, 0.2), trim=1, tau=1.0)
    _check_output(out, 7)


@pytest.mark.parametrize("name", SERVER_AGGREGATORS)
def test_every_server_aggregator_runs(name, stack):
    """Each server rule aggregates five updates into a float32 [d]."""
    _check_output(server_aggregate(name, stack, np.arange(1.0, 6.0), trim=1, f=1), 7)


@pytest.mark.parametrize("name", GOSSIP_AGGREGATORS)
def test_agreement_is_a_fixed_point_of_every_gossip_rule(name):
    """When every model is the same, each gossip rule returns it unchanged."""
    row = np.array([0.5, -3.0, 7.25], np.float32)
    out = gossip_aggregate(name, row, np.tile(row, (3, 1)), np.full(3, 0.25), trim=1, tau=0.1)
    np.testing.assert_array_equal(out, row)


@pytest.mark.parametrize("name", SERVER_AGGREGATORS)
def test_agreement_is_a_fixed_point_of_every_server_rule(name):
    """When every update is the same, each server rule returns it unchanged."""
    row = np.array([0.5, -3.0, 7.25], np.float32)
    out = server_aggregate(name, np.tile(row, (4, 1)), np.ones(4), trim=1, f=1)
    np.testing.assert_array_equal(out, row)


def test_the_plain_means_are_the_core_steps():
    """The registry's "mean" is gossip_step for a peer and fedavg_step for the server."""
    assert gossip_aggregator("mean", trim=1, tau=1.0) is gossip_step
    assert server_aggregator("mean", trim=1, f=1) is fedavg_step


@pytest.mark.parametrize(
    "call",
    [
        lambda: gossip_aggregator("krum", trim=1, tau=1.0),
        lambda: server_aggregator("clipping", trim=1, f=1),
        lambda: server_aggregator("Median", trim=1, f=1),
    ],
)
def test_unknown_names_list_the_allowed_ones(call):
    """A name outside the registry raises ValueError listing every allowed name, when the
    rule is built (once, from the config), not on its first round."""
    with pytest.raises(ValueError, match="unknown") as info:
        call()
    allowed = GOSSIP_AGGREGATORS if "gossip" in str(info.value) else SERVER_AGGREGATORS
    assert all(name in str(info.value) for name in allowed)


def test_gossip_trim_shrinks_to_fit_a_small_neighbourhood():
    """With one neighbour, trim = 5 falls back to trim 0: the mean of own and the neighbour."""
    own, other = np.array([0.0, 2.0], np.float32), np.array([[4.0, 6.0]], np.float32)
    out = gossip_aggregate("trimmed_mean", own, other, np.ones(1), trim=5, tau=1.0)
    np.testing.assert_array_equal(out, [2.0, 4.0])


def test_gossip_median_includes_own_as_one_row():
    """Own plus two received: the median is taken over all three rows."""
    own = np.array([10.0], np.float32)
    out = gossip_aggregate("median", own, np.array([[0.0], [1.0]]), np.ones(2), trim=0, tau=1.0)
    np.testing.assert_array_equal(out, [1.0])


def test_server_krum_shrinks_f_to_fit_and_ignores_an_outlier():
    """f = 10 with five updates: scored as f = 1, and n - f < 1 keeps the single best."""
    updates = np.array([[0.0], [0.1], [0.2], [0.3], [1e6]], np.float32)
    out = server_aggregate("krum", updates, np.ones(5), trim=0, f=10)
    assert out[0] in updates[:4, 0]
    out = server_aggregate("krum", updates, np.ones(5), trim=0, f=1)  # the mean of the 4 best
    np.testing.assert_allclose(out, [0.15], rtol=1e-6)


@pytest.mark.parametrize("n", [3, 4, 5])
def test_server_krum_leaves_the_outlier_out_even_when_n_forces_a_smaller_f(n):
    """krum_f = 1 with 3 or 4 updates: scored with f = 0, but still n - 1 kept, never the
    outlier (averaging all n would let it in)."""
    updates = np.ones((n, 2), np.float32)
    updates[0] = -100.0
    out = server_aggregate("krum", updates, np.ones(n), trim=0, f=1)
    np.testing.assert_array_equal(out, [1.0, 1.0])


def test_server_krum_with_two_updates_falls_back_to_the_median():
    """Krum needs n >= 3; with two updates the server takes their median (= their mean)."""
    updates = np.array([[0.0, 2.0], [4.0, 6.0]], np.float32)
    out = server_aggregate("krum", updates, np.ones(2), trim=0, f=1)
    np.testing.assert_array_equal(out, [2.0, 4.0])


def test_server_mean_is_the_weighted_fedavg(stack):
    """The FedAvg rule is sum w_j x_j / sum w_j, to float32 rounding of the float64 value,
    and bit for bit fedavg_step (it is that function)."""
    weights = np.array([3.0, 1.0, 7.0, 2.0, 5.0])
    out = np.asarray(server_aggregate("mean", stack, weights, trim=0, f=0))
    expected = np.average(stack.astype(np.float64), axis=0, weights=weights)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out, np.asarray(fedavg_step(stack, weights)))


def test_adaptive_tau_clips_the_farthest_share_of_the_weight():
    """tau is the largest distance left once the farthest neighbours (<= fraction) are cut."""
    own = np.zeros(2, np.float32)
    received = np.array([[d, 0.0] for d in (1.0, 2.0, 3.0, 40.0, 50.0, 60.0)], np.float32)
    weights = np.full(6, 1 / 7)
    assert adaptive_tau(own, received, weights, 0.45) == pytest.approx(3.0)  # 3/7 <= 0.45
    assert adaptive_tau(own, received, weights, 0.2) == pytest.approx(50.0)  # only 60 is cut
    assert adaptive_tau(own, received, weights, 0.0) == pytest.approx(60.0)  # nothing is cut
    out = gossip_aggregate("clipping", own, received, weights, trim=0, tau=None, clip_fraction=0.45)
    assert np.linalg.norm(out) <= 6 / 7 * 3.0 + 1e-5  # no neighbour pulled by more than tau
    with pytest.raises(ValueError, match="fraction"):
        adaptive_tau(own, received, weights, 1.0)
