"""Scenario -> the learning layer's plain settings (the only place learning meets a Scenario).

A custom model or dataset (`model.factory`, `data.loader`: a "module:function" in the
file, or Python objects given to `learning_spec`) is checked here before anything
starts (`check_custom`): the loader is called once, the model shape-checked with
`jax.eval_shape`; every failure is a `ScenarioError` naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfl.config.schema import Scenario, ScenarioError
from p2pfl.learning.local import DataSpec, LearningSpec, ModelSpec, TrainSpec
from p2pfl.learning.trainer import DpSgd

# What the Python API takes for a custom model: a factory (n_features, n_classes, key)
# -> model, or its "package.module:function".
ModelLike = str | Callable[..., Any]
# ... and for custom data: a loader () -> arrays, its "package.module:function", or the
# arrays themselves: (x, y) or (x, y, x_holdout, y_holdout).
DataLike = str | Callable[[], Any] | tuple[Any, ...]


def _template(s: Scenario, template: str) -> str:
    """`data.path` made absolute, its `{id}` field kept (braces in the folder escaped)."""
    if Path(template).is_absolute():
        return template
    folder = str(Path(s.base_dir).absolute())
    return str(Path(folder.replace("{", "{{").replace("}", "}}")) / template)


def _dp_sgd(s: Scenario) -> DpSgd | None:
    """DP-SGD's clip and noise for the trainer (`[privacy] mechanism = "dp_sgd"`)."""
    from p2pfl.config.privacy import dp_plan

    dp = dp_plan(s)
    if dp is None or dp.mechanism != "dp_sgd":
        return None
    return DpSgd(dp.clip, dp.sigma)


def data_spec(s: Scenario, data: DataLike | None = None) -> DataSpec:
    """Where every peer's data comes from and how it is split (`data`: as in
    `learning_spec`)."""
    d = s.data
    folder = str(Path(s.base_dir).absolute())
    loader: Any = d.loader
    if isinstance(data, tuple | list):
        from p2pfl.learning.custom import Given

        loader = Given(tuple(data))
    elif data is not None:
        loader = data
    return DataSpec(
        dataset="custom" if data is not None else d.dataset,
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
        loader=loader,
        import_dir=folder,
    )


def learning_spec(
    s: Scenario, model: ModelLike | None = None, data: DataLike | None = None
) -> LearningSpec:
    """What every peer of `s` learns: data and split, model, local training.

    `model` (a factory) and `data` (a loader or arrays) override the file's
    `model.factory` / `data.loader` and make the model / dataset custom; given, they are
    checked at once (raises ScenarioError naming the field).
    """
    m, t = s.model, s.training
    folder = str(Path(s.base_dir).absolute())
    spec_data = data_spec(s, data)
    spec_model = ModelSpec(
        kind="custom" if model is not None else m.kind,
        hidden=tuple(m.hidden),
        init=m.init,
        factory=model if model is not None else m.factory,
        import_dir=folder,
    )
    train = TrainSpec(
        optimizer=t.optimizer,
        learning_rate=t.learning_rate,
        batch_size=t.batch_size,
        local_epochs=t.local_epochs,
        dp_sgd=_dp_sgd(s),
    )
    spec = LearningSpec(spec_data, spec_model, train)
    if model is not None or data is not None:
        check_custom(spec)
    return spec


def check_custom(spec: LearningSpec, peer: int = 0) -> None:
    """Load a custom dataset (once) and shape-check a custom model for the data it will
    see (peer `peer`'s file, for npz); raises ScenarioError naming `data.loader` or
    `model.factory` and what is wrong. Nothing to do without either."""
    d, m = spec.data, spec.model
    if d.dataset != "custom" and m.kind != "custom":
        return
    from p2pfl.learning import custom
    from p2pfl.learning.local import load_dataset
    from p2pfl.learning.partition import min_pool, pool_size

    if d.dataset == "custom":
        where = f"data.loader = {custom.describe(d.loader or '')!r}"
        try:
            ds = load_dataset(d, peer)
        except custom.CustomError as exc:
            raise ScenarioError(f"{where}: {exc}") from None
        n = len(ds.y)
        if ds.holdout_rows:
            held, n_pool = ds.holdout_rows, n - ds.holdout_rows
        else:
            held, n_pool = round(n * d.test_fraction), pool_size(n, d.test_fraction)
        if held < 1:
            raise ScenarioError(
                f"{where}: the holdout of {len(ds.y)} samples would be empty "
                f"(data.test_fraction = {d.test_fraction})"
            )
        need = min_pool(d.peers, d.partition, d.shards_per_peer)
        if n_pool < need:
            raise ScenarioError(
                f"{where}: {n_pool} samples for the peers' shards (outside the holdout), and "
                f"the {d.partition!r} partition needs at least {need} to give "
                f"{d.peers} peers two each"
            )
        if m.kind == "cnn":
            raise ScenarioError(f"model.kind = 'cnn' needs image data: {where} gives rows")
    else:
        ds = load_dataset(d, peer)
    if m.kind == "custom":
        where = f"model.factory = {custom.describe(m.factory or '')!r}"
        features = int(ds.x.shape[1])
        try:
            model = custom.make_model(m.factory or "", features, ds.n_classes, d.seed, m.import_dir)
            custom.check_model(model, features, ds.n_classes)
        except custom.CustomError as exc:
            raise ScenarioError(f"{where}: {exc}") from None


def flips_labels(s: Scenario, peer_id: int) -> bool:
    """Whether peer `peer_id` is a label_flip Byzantine peer (`[[faults.byzantine]]`)."""
    attack = s.byzantine(peer_id)
    return attack is not None and attack.attack == "label_flip"
