"""Differential privacy in-process: the accountant against dp-accounting's own figures,
the update mechanism's clipping and noise, the settings' checks, both engines' noise."""

from __future__ import annotations

import json

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dp_accounting import dp_event, rdp

from p2pfl.config.loader import parse
from p2pfl.config.privacy import dp_plan
from p2pfl.config.schema import ScenarioError
from p2pfl.core import privacy


def rdp_reference(q: float, sigma: float, steps: int, delta: float) -> float:
    """dp-accounting's RDP accountant, called directly."""
    acc = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    acc.compose(dp_event.SelfComposedDpEvent(event, steps))
    return acc.get_epsilon(delta)


def test_the_published_dp_sgd_setting():
    """q = 256/60000, σ = 1.1, 60 epochs, δ = 1e-5 (Abadi et al.'s MNIST): RDP ≈ 2.60,
    PLD ≈ 2.38, each equal to dp-accounting's own value."""
    q, steps = 256 / 60000, int(60 * 60000 / 256)
    got = privacy.epsilon(q, 1.1, steps, 1e-5)
    assert got == pytest.approx(rdp_reference(q, 1.1, steps, 1e-5), rel=1e-12)
    assert got == pytest.approx(2.60, abs=0.005)
    pld = privacy.epsilon(q, 1.1, steps, 1e-5, "pld")
    assert pld == pytest.approx(2.38, abs=0.01) and pld < got


def test_epsilons_compose_round_by_round():
    schedule = privacy.DpSchedule(0.1, 1.3, 7, 1e-5)
    got = privacy.epsilons(schedule, [0, 1, 2, 5, 5, 10])
    want = [0.0] + [rdp_reference(0.1, 1.3, 7 * r, 1e-5) for r in (1, 2, 5, 5, 10)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got == sorted(got)
    with pytest.raises(ValueError, match="must not decrease"):
        privacy.epsilons(schedule, [3, 2])


def test_calibration_meets_the_target_and_refuses_the_impossible():
    sigma = privacy.calibrate(3.0, 1.0, 40, 1e-5)
    assert privacy.epsilon(1.0, sigma, 40, 1e-5) <= 3.0
    assert privacy.epsilon(1.0, sigma * 0.98, 40, 1e-5) > 3.0  # the smallest, nearly
    with pytest.raises(ValueError, match="cannot be met"):
        privacy.calibrate(1e-6, 1.0, 40, 1e-5)


def test_update_is_clipped_then_noised():
    dp = privacy.DpPlan(clip=0.5, sigma=1e-6, delta=1e-5)
    start = np.zeros(1000, np.float32)
    huge = start + 1e6  # a huge learning rate's update
    out = np.asarray(privacy.privatize(start, huge, dp, privacy.noise_key(0, 3, 1)))
    assert np.linalg.norm(out - start) == pytest.approx(0.5, rel=1e-4)
    assert np.allclose(out, 0.5 / np.sqrt(1000), rtol=1e-3)  # the direction is kept
    small = start + 1e-4  # inside the ball: unchanged but for the noise
    out = np.asarray(privacy.privatize(start, small, dp, privacy.noise_key(0, 3, 1)))
    assert np.allclose(out, small, atol=1e-5)


def test_noise_has_the_declared_scale_and_depends_on_seed_peer_round():
    dp = privacy.DpPlan(clip=2.0, sigma=1.5, delta=1e-5)
    start = np.zeros(200_000, np.float32)
    noise = np.asarray(privacy.privatize(start, start, dp, privacy.noise_key(7, 2, 4)))
    assert noise.std() == pytest.approx(3.0, rel=0.01) and abs(noise.mean()) < 0.02
    again = np.asarray(privacy.privatize(start, start, dp, privacy.noise_key(7, 2, 4)))
    assert np.array_equal(noise, again)
    for other in (
        privacy.noise_key(8, 2, 4),
        privacy.noise_key(7, 3, 4),
        privacy.noise_key(7, 2, 5),
    ):
        assert not np.allclose(noise, np.asarray(privacy.privatize(start, start, dp, other)))


def test_the_simulators_batched_noise_is_each_peers_own():
    dp = privacy.DpPlan(clip=1.0, sigma=0.7, delta=1e-5)
    rng = np.random.default_rng(0)
    start = rng.normal(size=(5, 300)).astype(np.float32)
    trained = start + rng.normal(size=(5, 300)).astype(np.float32)
    peers = np.array([4, 0, 9, 2, 7])
    many = np.asarray(
        privacy.privatize_many(jnp.asarray(start), jnp.asarray(trained), dp, 11, peers, 6)
    )
    for k, peer in enumerate(peers):
        one = privacy.privatize(start[k], trained[k], dp, privacy.noise_key(11, int(peer), 6))
        np.testing.assert_allclose(many[k], np.asarray(one), rtol=0, atol=2e-6)


def test_release_epsilon_is_the_accountants():
    dp = privacy.DpPlan(clip=1.0, sigma=2.0, delta=1e-6)
    assert privacy.release_epsilon(dp, 0) == 0.0
    for k in (1, 13):
        assert privacy.release_epsilon(dp, k) == pytest.approx(rdp_reference(1.0, 2.0, k, 1e-6))
    pld = privacy.DpPlan(clip=1.0, sigma=2.0, delta=1e-6, accountant="pld")
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(2.0), 13))
    assert privacy.release_epsilon(pld, 13) == pytest.approx(acc.get_epsilon(1e-6))
    assert json.dumps(dp.as_dict())  # the summary block is JSON


@pytest.mark.parametrize(
    "section, match",
    [
        ({"mechanism": "update", "noise_multiplier": -1.0}, r"privacy\.noise_multiplier = -1"),
        ({"mechanism": "update", "clip": 0.0}, r"privacy\.clip = 0"),
        ({"mechanism": "update", "clip": -2.0}, r"privacy\.clip = -2"),
        ({"mechanism": "update", "delta": 1.0}, r"privacy\.delta = 1"),
        ({"mechanism": "update", "delta": 0.0}, r"privacy\.delta = 0"),
        (
            {"mechanism": "update", "target_epsilon": 1e-6},
            r"privacy\.target_epsilon = 1e-06: .*cannot be met",
        ),
        ({"mechanism": "update", "target_epsilon": 3.0, "noise_multiplier": 2.0}, r"both set"),
        ({"mechanism": "laplace"}, r"privacy\.mechanism = 'laplace'"),
        ({"mechanism": "update", "sigma": 1.0}, r"privacy\.sigma: unknown field"),
    ],
)
def test_bad_privacy_settings_name_the_field(section, match):
    with pytest.raises(ScenarioError, match=match):
        parse({"privacy": section})


def test_defaults_and_calibration_from_the_scenario():
    assert dp_plan(parse({})) is None
    dp = dp_plan(parse({"privacy": {"mechanism": "update"}}))
    assert dp == privacy.DpPlan(1.0, 1.0, 1e-5, "rdp", batch_size=32, local_epochs=2)
    many = parse(
        {
            "topology": {"kind": "ring", "peers": 1000},
            "data": {"dataset": "synthetic", "synthetic_samples": 5000},
            "privacy": {"mechanism": "update"},
        }
    )
    assert dp_plan(many).delta == pytest.approx(1e-6)  # 1/peers² below 1e-5
    target = dp_plan(
        parse(
            {"training": {"rounds": 20}, "privacy": {"mechanism": "update", "target_epsilon": 5.0}}
        )
    )
    assert privacy.release_epsilon(target, 20) <= 5.0
    assert privacy.release_epsilon(target, 20) == pytest.approx(5.0, rel=0.02)


def test_dp_sgd_target_epsilon_is_met_by_every_shard_size():
    """DP-SGD's q and steps differ by shard size: the calibrated σ brings the worst-placed
    peer to the target and every other one under it (a Dirichlet split: many sizes)."""
    from p2pfl.config.privacy import shard_sizes

    raw = {
        "data": {"partition": "dirichlet", "alpha": 0.5},
        "training": {"rounds": 10},
        "privacy": {"mechanism": "dp_sgd", "target_epsilon": 3.0},
    }
    s = parse(raw)
    dp = dp_plan(s)
    sizes = shard_sizes(s)
    assert len(sizes) > 2
    eps = [privacy.spent(dp, 10, 10, n).epsilon for n in sizes]
    assert max(eps) <= 3.0 * (1 + 1e-6)
    assert max(eps) == pytest.approx(3.0, rel=0.02)
    with pytest.raises(ScenarioError, match=r"privacy\.target_epsilon = 1e-06: .*cannot be met"):
        parse({**raw, "privacy": {"mechanism": "dp_sgd", "target_epsilon": 1e-6}})


def test_central_mean_clips_each_update_and_noises_the_sum_once():
    dp = privacy.DpPlan(clip=1.0, sigma=1e-7, delta=1e-5, where="server", q=0.5)
    g = np.zeros(4, np.float32)
    models = np.array([[10.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, -3.0, 4.0]], np.float32)
    out = np.asarray(privacy.central_mean(g, models, dp, 4.0, privacy.noise_key(0, 8, 1)))
    # each update clipped to norm 1, summed, over the fixed denominator 4 (not 3)
    np.testing.assert_allclose(out, [0.25, 0.125, -0.15, 0.2], atol=1e-5)
    # one peer more or less moves the result by at most clip / expected
    fewer = np.asarray(privacy.central_mean(g, models[1:], dp, 4.0, privacy.noise_key(0, 8, 1)))
    assert np.linalg.norm(out - fewer) <= 1.0 / 4.0 + 1e-6
    loud = privacy.DpPlan(clip=2.0, sigma=3.0, delta=1e-5, where="server", q=0.5)
    noise = np.asarray(
        privacy.central_mean(
            np.zeros(100_000, np.float32),
            np.zeros((2, 100_000), np.float32),
            loud,
            5.0,
            privacy.noise_key(0, 8, 1),
        )
    )
    assert noise.std() == pytest.approx(3.0 * 2.0 / 5.0, rel=0.02)


def test_poisson_sampling_takes_each_peer_with_the_fraction():
    from p2pfl.protocol.fedavg_rounds import sample

    live = list(range(200))
    sizes = [
        len(sample(live, r, seed=1, fraction=0.3, min_updates=1, poisson=True))
        for r in range(1, 101)
    ]
    assert 0.27 < np.mean(sizes) / 200 < 0.33 and len(set(sizes)) > 5  # sizes vary
    assert sample(live, 5, seed=1, fraction=0.3, min_updates=1, poisson=True) == sample(
        live, 5, seed=1, fraction=0.3, min_updates=1, poisson=True
    )
    assert len(sample(live, 5, seed=1, fraction=0.3, min_updates=1)) == 60  # fixed size


def test_central_dp_is_for_the_centralized_mean_and_amplified():
    with pytest.raises(ScenarioError, match=r"where = 'server' .* mode = 'centralized'"):
        parse({"privacy": {"mechanism": "update", "where": "server"}})
    with pytest.raises(ScenarioError, match=r"centralized.aggregator = 'median'"):
        parse(
            {
                "mode": "centralized",
                "centralized": {"aggregator": "median"},
                "privacy": {"mechanism": "update", "where": "server"},
            }
        )
    raw = {"mode": "centralized", "centralized": {"fraction": 0.25}, "training": {"rounds": 30}}
    central = dp_plan(
        parse({**raw, "privacy": {"mechanism": "update", "where": "server", "target_epsilon": 2.0}})
    )
    local = dp_plan(parse({**raw, "privacy": {"mechanism": "update", "target_epsilon": 2.0}}))
    assert central.q == 0.25 and local.q == 1.0
    assert central.sigma < local.sigma  # sampling amplifies: less noise for the same ε
    assert privacy.release_epsilon(central, 30) == pytest.approx(2.0, rel=0.02)
    assert privacy.spent(central, 0, 7) == privacy.Spent(
        privacy.release_epsilon(central, 7), 7, 0.25
    )
    assert privacy.spent(local, 3, 7).steps == 3


def _mlp_loss():
    from p2pfl.learning.models import make_model

    model = make_model("mlp", 8, 3, (16,), None)
    params = model.init(jax.random.PRNGKey(0))

    def one(p, x, y):
        import optax

        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x[None]), y[None])[0]

    return params, one


def test_dp_sgd_clips_every_example_gradient():
    from p2pfl.learning.trainer import clipped_example_grads as eager

    clipped_example_grads = jax.jit(eager, static_argnums=0)  # eager vmap(grad) is slow

    params, one = _mlp_loss()
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(0, 50, (40, 8)), jnp.float32)  # huge inputs: huge gradients
    y = jnp.asarray(rng.integers(0, 3, 40))
    _, raw = clipped_example_grads(one, params, x, y, 1e9)
    _, clipped = clipped_example_grads(one, params, x, y, 0.1)

    def norms(tree):
        return np.sqrt(
            sum(np.sum(np.asarray(g).reshape(40, -1) ** 2, axis=1) for g in jax.tree.leaves(tree))
        )

    before, after = norms(raw), norms(clipped)
    assert (before > 0.1).sum() >= 30  # most needed clipping ...
    assert after.max() <= 0.1 * (1 + 1e-5)  # ... none is longer than clip after it
    np.testing.assert_allclose(after[before > 0.1], 0.1, rtol=1e-4)
    np.testing.assert_allclose(after[before <= 0.1], before[before <= 0.1], rtol=1e-5)
    small = x / 1e4
    _, same = clipped_example_grads(one, params, small, y, 1e9)
    _, kept = clipped_example_grads(one, params, small, y, 10.0)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(kept), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)  # inside: as is


def test_dp_sgd_gradient_sums_the_taken_rows_over_the_expected_batch():
    from p2pfl.learning import trainer
    from p2pfl.learning.trainer import DpSgd

    clipped_example_grads = jax.jit(trainer.clipped_example_grads, static_argnums=0)
    dp_sgd_gradient = jax.jit(trainer.dp_sgd_gradient, static_argnums=(0, 5))

    params, one = _mlp_loss()
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 20))
    taken = jnp.asarray(rng.random(20) < 0.4)
    _, g = dp_sgd_gradient(one, params, x, y, taken, DpSgd(0.5, 1e-9), jax.random.PRNGKey(3), 8.0)
    _, each = clipped_example_grads(one, params, x, y, 0.5)
    for got, rows in zip(jax.tree.leaves(g), jax.tree.leaves(each), strict=True):
        want = np.asarray(rows)[np.asarray(taken)].sum(axis=0) / 8.0
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    _, noisy = dp_sgd_gradient(
        one, params, x, y, taken * False, DpSgd(0.5, 2.0), jax.random.PRNGKey(3), 8.0
    )
    flat = np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree.leaves(noisy)])
    assert flat.std() == pytest.approx(2.0 * 0.5 / 8.0, rel=0.15)  # noise alone: sigma * clip / B


def test_dp_sgd_accounting_per_peer():
    assert privacy.dp_sgd_schedule(200, 32, 2) == (0.16, 14)
    assert privacy.dp_sgd_schedule(10, 32, 3) == (1.0, 3)
    dp = privacy.DpPlan(1.0, 1.1, 1e-5, mechanism="dp_sgd", batch_size=32, local_epochs=2)
    got = privacy.spent(dp, 5, 9, 200)
    assert got.steps == 70 and got.q == 0.16
    assert got.epsilon == pytest.approx(rdp_reference(0.16, 1.1, 70, 1e-5), rel=1e-9)
    with pytest.raises(ScenarioError, match="where = 'server' is for mechanism = 'update'"):
        parse({"mode": "centralized", "privacy": {"mechanism": "dp_sgd", "where": "server"}})
