"""The simulator in-process: stacked set-up, mixing theory at scale, faults as masks."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from p2pfl.config.loader import graph, parse
from p2pfl.config.plan import sim_plan
from p2pfl.config.schema import ScenarioError
from p2pfl.core.graphs import mixing_matrix, report
from p2pfl.learning import exported
from p2pfl.learning.local import build
from p2pfl.sim import population
from p2pfl.sim.engine import simulate
from p2pfl.sim.gossip import neighbourhoods
from p2pfl.sim.schedule import Schedule
from tests.conftest import ROOT, merge, read_jsonl

# small and quick to compile: these tests are about the engine, not the accuracy
QUICK = {"model": {"kind": "logreg"}, "training": {"local_epochs": 1}}


def scenario(overrides: dict | None = None):
    raw = tomllib.loads((ROOT / "scenarios" / "quickstart.toml").read_text())
    return parse(merge(merge(raw, QUICK), overrides or {}))


def run(tmp_path: Path, overrides: dict, name: str = "run"):
    s = scenario(overrides)
    return simulate(sim_plan(s, tmp_path / name)), s


def test_stacked_set_up_is_each_peers_own():
    """Vmapped init and the stacked shards equal what each networked peer builds alone."""
    s = scenario(
        {
            "topology": {"peers": 5},
            "model": {"init": "per_peer"},
            "data": {"partition": "dirichlet"},
        }
    )
    plan = sim_plan(s, Path("unused"))
    pop = population.build(plan.learning, chunk=3)  # chunks of 3: padding exercised
    states = population.initial_states(pop, plan.learning)
    for i in range(s.peers):
        local = build(plan.learning, i)
        assert np.array_equal(np.asarray(states.params[i]), np.asarray(local.state.params))
        assert np.array_equal(np.asarray(states.key[i]), np.asarray(local.state.key))
        assert np.array_equal(pop.train.x[i], np.asarray(local.data.train.x))
        assert int(pop.train.n[i]) == local.data.n_train == int(pop.n_train[i])


def test_chunked_training_equals_one_call():
    s = scenario()
    plan = sim_plan(s, Path("unused"))
    whole = population.build(plan.learning, chunk=8)
    chunked = population.build(plan.learning, chunk=3)
    states = population.initial_states(whole, plan.learning)
    a, _ = population.train(whole, states)
    b, _ = population.train(chunked, states)
    assert float(np.abs(np.asarray(a.params) - np.asarray(b.params)).max()) <= 1e-6
    rows = np.array([5, 1, 6])
    c, _ = population.train(chunked, states, rows)
    assert float(np.abs(np.asarray(c.params) - np.asarray(a.params)[rows]).max()) <= 1e-6


def test_neighbourhood_weights_are_the_mixing_matrix():
    s = scenario({"topology": {"kind": "barabasi_albert", "peers": 12, "m": 2}})
    g = graph(s)
    nb = neighbourhoods([sorted(g.neighbors(i)) for i in range(s.peers)], "metropolis")
    w = mixing_matrix(g, "metropolis")
    dense = np.zeros_like(w)
    for i in range(s.peers):
        for slot in range(nb.idx.shape[1]):
            if nb.real[i, slot]:
                dense[i, nb.idx[i, slot]] = nb.weight[i, slot]
    off = ~np.eye(s.peers, dtype=bool)
    assert np.allclose(dense[off], w[off], atol=1e-7)
    assert (nb.weight[~nb.real] == 0).all()


@pytest.mark.slow  # 2 x 1,000 peers: ~25 s of compute
@pytest.mark.parametrize(
    "topology", [{"kind": "ring", "peers": 1000}, {"kind": "regular", "degree": 6, "peers": 1000}]
)
def test_consensus_at_scale_decays_like_lambda_and_keeps_the_mean(tmp_path, topology):
    """1,000 peers, learning_rate 0: pure mixing from distinct initial models."""
    rounds = 12
    overrides = {
        "topology": topology,
        "data": {"dataset": "synthetic", "synthetic_samples": 6000, "synthetic_features": 8},
        "model": {"kind": "logreg", "init": "per_peer"},
        "training": {"rounds": rounds, "learning_rate": 0.0, "local_epochs": 1},
    }
    s = scenario(overrides)
    plan = sim_plan(s, tmp_path / "x")
    pop = population.build(plan.learning, chunk=1024)
    x0 = np.asarray(population.initial_states(pop, plan.learning).params, np.float64)
    result = simulate(plan)
    x = result.models.astype(np.float64)
    lam = report(graph(s), "metropolis").slem
    spread0 = np.linalg.norm(x0 - x0.mean(0))
    spread = np.linalg.norm(x - x.mean(0))
    print(f"{topology['kind']}: spread ratio {spread / spread0:.3e} vs lambda^R {lam**rounds:.3e}")
    assert spread <= lam**rounds * spread0 * (1 + 1e-3)
    assert float(np.abs(x.mean(0) - x0.mean(0)).max()) <= 1e-5


@pytest.mark.parametrize("mode", ["gossip", "centralized"])
def test_exported_batched_programs_compute_what_jit_computes(tmp_path, program_store, mode):
    """With a program store, the batched programs are exported by the first run and read
    back (never traced) by the next; every run gets bit-identical models and figures."""
    overrides = {"mode": mode, "training": {"rounds": 2}}
    exported_run, s = run(tmp_path, overrides, "first")
    stored = sorted(program_store.iterdir())
    assert len(stored) >= 4  # init, train, evaluate (with and without the holdout)...
    pop = population.build(sim_plan(s, tmp_path / "x").learning, 1024)
    assert isinstance(pop.train_step, exported.Program)
    read_back, _ = run(tmp_path, overrides, "second")
    assert sorted(program_store.iterdir()) == stored  # nothing exported again
    with pytest.MonkeyPatch.context() as m:
        m.setattr(exported, "store", lambda: None)
        traced, _ = run(tmp_path, overrides, "traced")
    for other in (read_back, traced):
        assert np.array_equal(other.models, exported_run.models)
        for k, v in exported_run.history.items():
            np.testing.assert_array_equal(other.history[k], v)


def test_outputs_match_a_launch_run_folder(tmp_path):
    result, _ = run(tmp_path, {"training": {"rounds": 3}})
    out = result.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary
    assert summary["engine"] == "sim" and summary["completed_peers"] == list(range(8))
    assert summary["bytes_sent_total"] is None
    rows = read_jsonl(out / "peer-0.jsonl")
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["evaluated_on"] == "mixed" and rows[1]["neighbours_heard"] == [1, 7]
    assert rows[1]["bytes_sent"] is None and rows[1]["train_loss"] > 0
    final = np.load(out / "models" / "peer-3.npz")["params"]
    assert np.array_equal(final, result.models[3])
    assert result.history["holdout_accuracy"].shape == (4, 8)
    assert np.allclose(
        result.history["holdout_accuracy"][3],
        [
            r[-1]["holdout_accuracy"]
            for r in (read_jsonl(out / f"peer-{i}.jsonl") for i in range(8))
        ],
    )


def test_crash_masks_the_peer_and_rejoin_catches_up(tmp_path):
    faults = {
        "crash": [{"peer": 3, "at_round": 2}, {"peer": 5, "at_round": 2, "rejoin_after_s": 2}]
    }
    result, _ = run(tmp_path, {"training": {"rounds": 6}, "faults": faults})
    out = result.out
    assert [r["round"] for r in read_jsonl(out / "peer-3.jsonl")] == [0, 1]
    # sim.round_s = 1: back 2 rounds after the crash round, caught up first
    assert [r["round"] for r in read_jsonl(out / "peer-5.jsonl")] == [0, 1, 4, 5, 6]
    line = read_jsonl(out / "peer-2.jsonl")[2]
    assert line["neighbours_missing"] == [3] and line["neighbours_heard"] == [1]
    assert result.summary["crashed_peers"] == [3, 5]
    assert 3 not in result.summary["completed_peers"] and 5 in result.summary["completed_peers"]


def test_nan_attacker_is_never_mixed_in_and_link_drop_loses_models(tmp_path):
    faults = {"byzantine": [{"peer": 0, "attack": "nan"}], "link_drop": 0.3}
    result, _ = run(tmp_path, {"training": {"rounds": 4}, "faults": faults})
    assert np.isfinite(result.models[1:]).all()
    lines = [r for i in range(1, 8) for r in read_jsonl(result.out / f"peer-{i}.jsonl")[1:]]
    lost = sum(len(r["neighbours_missing"]) for r in lines)
    assert 0 < lost < sum(len(r["neighbours_missing"]) + len(r["neighbours_heard"]) for r in lines)


def test_wall_time_faults_longer_than_a_round_are_refused():
    s = scenario({"faults": {"slow": [{"peer": 1, "delay_s": 30.0}]}})
    with pytest.raises(ScenarioError, match=r"faults\.slow\[0\]\.delay_s"):
        sim_plan(s, Path("unused"))
    s = scenario({"faults": {"slow": [{"peer": 1, "delay_s": 0.5}]}})  # heard anyway: runs
    assert sim_plan(s, Path("unused")).transforms == {}


def test_centralized_schedule_kills_on_the_first_sampled_round():
    sched = Schedule(4, {2: (3, 5)}, mode="centralized")
    assert sched.sampled(2, [1, 2]) == set()  # before at_round
    assert sched.sampled(3, [0, 1]) == set()  # not sampled: lives on
    assert sched.sampled(4, [2, 3]) == {2}
    assert sched.alive(5).tolist() == [True, True, False, True]
    assert sched.alive(6).tolist() == [True] * 4  # back 2 rounds later, as planned
    assert sched.crashed == [2]


def test_more_peers_than_a_launch_runs_are_for_the_simulator(tmp_path):
    from rich.console import Console

    from p2pfl.app.launch import launch
    from p2pfl.app.ports import LaunchError

    big = {
        "topology": {"peers": 40_000},
        "data": {"dataset": "synthetic", "synthetic_samples": 100_000},
    }
    s = scenario(big)  # base_port + peers > 65535: no matter, the simulator binds nothing
    with pytest.raises(LaunchError, match="p2pfl simulate"):
        launch(s, None, tmp_path / "run", Console(quiet=True))
