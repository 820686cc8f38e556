"""The examples run: the Flax CNN through the Python API, the custom hospital loader."""

from __future__ import annotations

import pytest

import p2pfl
from p2pfl.config.loader import load
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # a CNN on mnist5k: ~20 s


def test_flax_cnn_example_learns_through_the_api(tmp_path):
    from examples.flax_cnn_mnist import cnn

    s = load(ROOT / "examples" / "flax_cnn_mnist.toml")
    raw = s.model_dump(mode="json", exclude_none=True)
    raw["training"]["rounds"] = 2
    raw["model"] = {"kind": "mlp"}  # the object below replaces it
    result = p2pfl.simulate(raw, model=cnn, out=tmp_path / "cnn", progress=False)
    acc = result.summary["final_holdout_accuracy"]["mean"]
    print(f"Flax CNN on mnist5k, 2 rounds: {acc:.3f}")
    assert acc > 0.5


def test_hospital_loader_example_learns(tmp_path):
    s = load(ROOT / "examples" / "hospitals_custom.toml")
    result = p2pfl.simulate(s, out=tmp_path / "hospitals", progress=False)
    acc = result.summary["final_holdout_accuracy"]["mean"]
    print(f"hospitals, custom loader, {s.training.rounds} rounds: {acc:.3f}")
    assert acc > 0.9
