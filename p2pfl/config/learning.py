"""Scenario -> the learning layer's plain settings (the only place learning meets a Scenario)."""

from __future__ import annotations

from pathlib import Path

from p2pfl.config.schema import Scenario
from p2pfl.learning.local import DataSpec, LearningSpec, ModelSpec, TrainSpec


def _template(s: Scenario, template: str) -> str:
    """`data.path` made absolute, its `{id}` field kept (braces in the folder escaped)."""
    if Path(template).is_absolute():
        return template
    folder = str(Path(s.base_dir).absolute())
    return str(Path(folder.replace("{", "{{").replace("}", "}}")) / template)


def learning_spec(s: Scenario) -> LearningSpec:
    """What every peer of `s` learns: data and split, model, local training."""
    d, m, t = s.data, s.model, s.training
    data = DataSpec(
        dataset=d.dataset,
        peers=s.peers,
        seed=s.seed,
        partition=d.partition,
        alpha=d.alpha,
        shards_per_peer=d.shards_per_peer,
        test_fraction=d.test_fraction,
        peer_test_fraction=d.peer_test_fraction,
        synthetic_samples=d.synthetic_samples,
        synthetic_features=d.synthetic_features,
        synthetic_classes=d.synthetic_classes,
        path=_template(s, d.path),
        holdout=None if d.holdout is None else s.resolve(d.holdout).absolute(),
        classes=d.classes,
    )
    model = ModelSpec(kind=m.kind, hidden=tuple(m.hidden), init=m.init)
    train = TrainSpec(
        optimizer=t.optimizer,
        learning_rate=t.learning_rate,
        batch_size=t.batch_size,
        local_epochs=t.local_epochs,
    )
    return LearningSpec(data, model, train)


def flips_labels(s: Scenario, peer_id: int) -> bool:
    """Whether peer `peer_id` is a label_flip Byzantine peer (`[[faults.byzantine]]`)."""
    attack = s.byzantine(peer_id)
    return attack is not None and attack.attack == "label_flip"
