"""The Python API: simulate / launch / compare / load_run return the run as values."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import p2pfl
from p2pfl.config.schema import ScenarioError

QUICK = {"model": {"kind": "logreg"}, "training": {"rounds": 3, "local_epochs": 1}}


def test_simulate_a_dict_and_read_it_back(tmp_path):
    result = p2pfl.simulate(QUICK, out=tmp_path / "run", progress=False)
    assert result.summary["engine"] == "sim" and result.summary["rounds"] == 3
    assert result.models.shape == (8, 650) and np.isfinite(result.models).all()
    acc = result.history["holdout_accuracy"]
    assert acc.shape == (4, 8) and not np.isnan(acc).any()
    back = p2pfl.load_run(tmp_path / "run")
    assert back.summary == result.summary
    assert np.array_equal(back.models, result.models)
    for k, v in result.history.items():
        assert np.allclose(back.history[k], v, equal_nan=True), k


def test_compare_in_the_simulator(tmp_path):
    cmp = p2pfl.compare(QUICK, engine="sim", out=tmp_path, progress=False)
    assert cmp.centralized.summary["mode"] == "centralized"
    assert cmp.gossip.summary["mode"] == "gossip"
    assert cmp.centralized.global_model is not None
    # every centralized peer ends holding the final global model
    assert np.array_equal(cmp.centralized.models[0], cmp.centralized.global_model)
    assert json.loads((tmp_path / "compare.json").read_text()) == cmp.report
    assert cmp.report["modes"]["gossip"]["bytes_sent_total"] is None  # nothing on a wire


def test_bad_scenarios_are_scenario_errors(tmp_path):
    with pytest.raises(ScenarioError, match=r"training\.rounds"):
        p2pfl.simulate({"training": {"rounds": -1}}, out=tmp_path, progress=False)
    with pytest.raises(ScenarioError, match="expected a path"):
        p2pfl.simulate(42, out=tmp_path, progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"no summary\.json"):
        p2pfl.load_run(tmp_path / "nothing")


@pytest.mark.slow
def test_launch_from_a_dict_matches_simulate(tmp_path):
    from p2pfl.app.ports import free_base_port

    raw = {**QUICK, "network": {"base_port": free_base_port(10)}}
    launched = p2pfl.launch(raw, out=tmp_path / "launch", progress=False)
    simulated = p2pfl.simulate(raw, out=tmp_path / "sim", progress=False)
    assert launched.summary["engine"] == "launch"
    assert float(np.abs(launched.models - simulated.models).max()) <= 1e-4


@pytest.mark.slow
def test_two_host_devices_give_the_same_models_as_one(tmp_path):
    """The peer axis sharded across 2 (forced host) devices: the same results."""
    code = (
        "import sys, jax, numpy as np, p2pfl\n"
        "r = p2pfl.simulate({'model': {'kind': 'logreg'}, 'topology': {'peers': 6},"
        " 'training': {'rounds': 3, 'local_epochs': 1}, 'sim': {'chunk': 4}},"
        " out=sys.argv[1], progress=False)\n"
        "print(len(jax.devices()))\n"
    )
    models = {}
    for devices in (1, 2):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        out = tmp_path / f"d{devices}"
        done = subprocess.run(
            [sys.executable, "-c", code, str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[-1] == str(devices)
        models[devices] = p2pfl.load_run(out).models
    diff = float(np.abs(models[1] - models[2]).max())
    print(f"1 vs 2 devices: max abs difference {diff:.2e}")
    assert diff <= 1e-6


def test_python_model_and_data_train_like_the_builtin(tmp_path):
    """An Equinox MLP given as an object, on digits given as arrays: the accuracy of the
    built-in MLP on the built-in digits, within one point."""
    from tests import custom_models

    base = {"training": {"rounds": 10}}
    builtin = p2pfl.simulate(base, out=tmp_path / "builtin", progress=False)
    custom = p2pfl.simulate(
        base,
        model=custom_models.equinox_mlp,
        data=custom_models.digits(),
        out=tmp_path / "custom",
        progress=False,
    )
    a = builtin.summary["final_holdout_accuracy"]["mean"]
    b = custom.summary["final_holdout_accuracy"]["mean"]
    print(f"built-in {a:.4f}, Equinox on given arrays {b:.4f}")
    assert abs(a - b) <= 0.01


@pytest.mark.slow
def test_custom_model_by_name_is_the_same_in_both_engines(tmp_path):
    from p2pfl.app.ports import free_base_port

    raw = {
        **QUICK,
        "model": {"kind": "custom", "factory": "tests.custom_models:linen_mlp"},
        "network": {"base_port": free_base_port(10)},
    }
    launched = p2pfl.launch(raw, out=tmp_path / "launch", progress=False)
    simulated = p2pfl.simulate(raw, out=tmp_path / "sim", progress=False)
    diff = float(np.abs(launched.models - simulated.models).max())
    print(f"Flax linen factory, launch vs simulate: {diff:.2e}")
    assert diff <= 1e-4
