"""Faults injected from the scenario (`[faults]`): crashes and Byzantine behaviour.

A crashing peer dies by SIGKILL when it reaches its round. A Byzantine peer trains
like any other but sends `poison(model)` instead of its model (sign_flip, scale,
gaussian, nan), or trains on flipped labels and sends the result honestly
(label_flip). They exist to show what the robust aggregators are for: the attacks are
real, and the defences are measured against them.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import numpy as np

from p2pfl.scenario import Byzantine


def die(logger: Any) -> None:
    """An injected crash (`[faults] crash`): SIGKILL, no clean-up, as a power cut would."""
    logger.warning("crash_injected")
    os.kill(os.getpid(), signal.SIGKILL)


def poison(attack: Byzantine, model: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a Byzantine peer sends in place of `model` (float32, same shape)."""
    if attack.attack == "sign_flip":
        out = -model
    elif attack.attack == "scale":
        out = attack.factor * model
    elif attack.attack == "gaussian":
        out = model + rng.normal(0.0, attack.sigma, model.shape)
    elif attack.attack == "nan":
        out = np.full_like(model, np.nan)
    else:  # label_flip poisons the training data, not the message
        out = model
    return np.ascontiguousarray(out, dtype=np.float32)


def flip_labels(y: np.ndarray, n_classes: int) -> np.ndarray:
    """label_flip: class c becomes n_classes - 1 - c (every label wrong when n_classes > 1)."""
    return (n_classes - 1 - y).astype(y.dtype)
