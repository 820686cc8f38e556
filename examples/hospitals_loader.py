"""A custom loader: a synthetic patient table shaped like `scenarios/hospitals.toml`'s.

Three hospitals hold different patients (rows) with the same 30 standardised features
(columns) and a binary outcome: a horizontal split, which p2pfl's partition makes from
the one table the loader returns. The loader also returns a separate reference cohort,
the common holdout every hospital and the server evaluate on.

    p2pfl simulate examples/hospitals_custom.toml
    p2pfl compare examples/hospitals_custom.toml --engine sim
"""

from __future__ import annotations

import numpy as np

FEATURES = 30  # as the Wisconsin breast-cancer records of scenarios/hospitals.toml
PATIENTS = 600  # shared among the hospitals
REFERENCE = 150  # the common holdout
INFORMATIVE = 10  # features whose mean differs between the two outcomes
SEPARATION = 0.5  # how far apart: the scenario reaches about 0.96 holdout accuracy
SEED = 7  # fixed: every peer process calls the loader and must get the same table


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, x_holdout, y_holdout): float32 features, int labels (1 benign, 0 malignant)."""
    rng = np.random.default_rng(SEED)
    n = PATIENTS + REFERENCE
    y = (rng.random(n) < 0.63).astype(np.int64)  # the benign share of the real data
    shift = np.zeros(FEATURES)
    shift[:INFORMATIVE] = rng.normal(0.0, SEPARATION, INFORMATIVE)
    mixing = rng.normal(0.0, 0.3, (FEATURES, FEATURES)) + np.eye(FEATURES)
    x = rng.normal(0.0, 1.0, (n, FEATURES)) @ mixing + np.outer(2 * y - 1, shift)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)  # standardised, as the real loader
    return x[:PATIENTS], y[:PATIENTS], x[PATIENTS:], y[PATIENTS:]
