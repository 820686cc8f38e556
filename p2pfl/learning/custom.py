"""Bring-your-own model and data: a user's factory or loader, resolved, adapted and checked.

A model factory is called as `factory(n_features, n_classes, key)` (`key` is
`jax.random.PRNGKey(seed)`) and returns one of:

* an `(init, apply)` pair over a pytree: `p2pfl.learning.models.ModelDef`;
* a Flax linen module: `init(k) = module.init(k, x)["params"]`, `apply(p, x) =
  module.apply({"params": p}, x)` (only a `params` collection is supported);
* a Flax nnx module: the params pytree is its `nnx.Param` state (`nnx.split`), apply
  merges it back; any other state (batch statistics, RNG counts) stays at its initial
  value;
* an Equinox module, taking ONE example `[n_features] -> [n_classes]`: the params are
  its inexact-array leaves (`eqx.partition(model, eqx.is_inexact_array)`) and apply
  `jax.vmap`s the recombined module over the batch.

For nnx and Equinox, `init(k)` calls the factory again with `k`, so that each peer's
initial parameters still come from p2pfl's init stream (`model.init = "per_peer"`
keeps its meaning). flax and equinox are imported only when the factory returned one of
their modules.

A data loader takes no arguments and returns `(x, y)` or `(x, y, x_holdout, y_holdout)`
(see `p2pfl.learning.datasets.from_arrays`). It must be deterministic: every peer
process calls it and keeps its own shard. Within one process it is called once.

A reference is a callable or a `"package.module:function"` string, imported with
`import_dir` (the scenario's folder) on `sys.path`. Every failure of the user's code
or its results is a `CustomError` saying what went wrong; the config layer names the
field.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from p2pfl.learning import datasets
from p2pfl.learning.models import ModelDef, Params

Factory = Callable[[int, int, jax.Array], Any]  # (n_features, n_classes, key) -> model
Loader = Callable[[], Any]  # () -> (x, y) or (x, y, x_holdout, y_holdout)
Ref = str | Factory | Loader  # a callable, or its "package.module:function"

_CHECK_BATCHES = (1, 5)  # batch sizes the model's apply is shape-checked on


class CustomError(ValueError):
    """A user's factory or loader that cannot be used; the message says why."""


def describe(ref: Ref) -> str:
    """How a reference is named in messages: the string, or the callable's module:name."""
    if isinstance(ref, str):
        return ref
    if isinstance(ref, Given):
        return "<arrays>"
    name = getattr(ref, "__qualname__", None) or type(ref).__name__
    return f"{getattr(ref, '__module__', '?')}:{name}"


def resolve(ref: Ref, import_dir: str | None = None) -> Callable[..., Any]:
    """The callable `ref` names: itself, or `module:function` imported (with `import_dir`
    on `sys.path` while importing, so that a file beside the scenario is found)."""
    if not isinstance(ref, str):
        if not callable(ref):
            raise CustomError(f"not callable: {type(ref).__name__}")
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise CustomError("expected 'package.module:function'")
    folder = str(Path(import_dir).absolute()) if import_dir is not None else None
    added = folder is not None and folder not in sys.path
    if added:
        sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error means it cannot be used
        raise CustomError(f"cannot import {module_name!r} ({type(exc).__name__}: {exc})") from None
    finally:
        if added:
            sys.path.remove(str(folder))
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CustomError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CustomError(f"{attr!r} is not callable ({type(obj).__name__})")
    return obj


def _user_call(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`, with any exception of the user's code as a CustomError."""
    try:
        return fn(*args)
    except CustomError:
        raise
    except Exception as exc:
        raise CustomError(f"{what} raised {type(exc).__name__}: {exc}") from None


# -- data ------------------------------------------------------------------------------


class Given:
    """A loader returning arrays given directly: (x, y) or (x, y, x_holdout, y_holdout)."""

    def __init__(self, arrays: tuple[Any, ...]) -> None:
        self.arrays = arrays

    def __call__(self) -> tuple[Any, ...]:
        return self.arrays


def load_data(ref: Ref, import_dir: str | None, n_classes: int | None) -> datasets.Dataset:
    """The dataset the loader returns, checked; the loader is called once per process and
    arguments (the arrays are read-only: every caller shares them)."""
    try:
        hash(ref)
    except TypeError:  # an unhashable callable object: not cached
        return _load(ref, import_dir, n_classes)
    return _cached_load(ref, import_dir, n_classes)


def _load(ref: Ref, import_dir: str | None, n_classes: int | None) -> datasets.Dataset:
    out = _user_call("the loader", resolve(ref, import_dir))
    if not isinstance(out, tuple | list) or len(out) not in (2, 4):
        raise CustomError(
            f"must return (x, y) or (x, y, x_holdout, y_holdout), got {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple | list) else "")
        )
    holdout = None if len(out) == 2 else (out[2], out[3])
    try:
        ds = datasets.from_arrays(out[0], out[1], holdout, n_classes)
    except ValueError as exc:
        raise CustomError(str(exc)) from None
    ds.x.flags.writeable = False
    ds.y.flags.writeable = False
    return ds


_cached_load = functools.lru_cache(maxsize=4)(_load)  # a few datasets, not every one seen


# -- models ----------------------------------------------------------------------------


def _from(obj: object, package: str) -> bool:
    """Whether `obj`'s class comes from `package` (checked without importing it)."""
    return any(c.__module__.startswith(package) for c in type(obj).__mro__)


def _linen(module: Any, n_features: int) -> ModelDef:
    dummy = jnp.zeros((1, n_features), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.ShapeDtypeStruct((2,), jnp.uint32), dummy)
    others = sorted(set(shapes) - {"params"})
    if others:
        raise CustomError(
            f"the linen module has collections {others} besides 'params': not supported, "
            "return an (init, apply) pair instead"
        )

    def init(key: jax.Array) -> Params:
        return module.init(key, dummy)["params"]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return module.apply({"params": params}, x)

    return ModelDef(init, apply)


def _nnx(module: Any, rebuild: Callable[[jax.Array], Any]) -> ModelDef:
    from flax import nnx

    graphdef, _, *others = nnx.split(module, nnx.Param, ...)  # ... : the rest of the state

    def init(key: jax.Array) -> Params:
        return nnx.split(rebuild(key), nnx.Param, ...)[1]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, params, *others)(x)

    return ModelDef(init, apply)


def _equinox(module: Any, rebuild: Callable[[jax.Array], Any]) -> ModelDef:
    import equinox as eqx

    static = eqx.partition(module, eqx.is_inexact_array)[1]

    def init(key: jax.Array) -> Params:
        return eqx.partition(rebuild(key), eqx.is_inexact_array)[0]

    def apply(params: Params, x: jax.Array) -> jax.Array:
        return jax.vmap(eqx.combine(params, static))(x)

    return ModelDef(init, apply)


def adapt(obj: Any, n_features: int, rebuild: Callable[[jax.Array], Any]) -> ModelDef:
    """`obj` (what a factory returned) as a `ModelDef`; `rebuild(key)` makes it again."""
    if isinstance(obj, tuple) and len(obj) == 2 and all(callable(f) for f in obj):
        return ModelDef(*obj)
    if _from(obj, "flax.linen"):
        from flax import linen

        if isinstance(obj, linen.Module):
            return _linen(obj, n_features)
    if _from(obj, "flax.nnx"):
        from flax import nnx

        if isinstance(obj, nnx.Module):
            return _nnx(obj, rebuild)
    if _from(obj, "equinox"):
        import equinox as eqx

        if isinstance(obj, eqx.Module):
            return _equinox(obj, rebuild)
    raise CustomError(
        "must return an (init, apply) pair, a flax.linen or flax.nnx Module or an "
        f"equinox.Module, got {type(obj).__name__}"
    )


def make_model(
    ref: Ref, n_features: int, n_classes: int, seed: int, import_dir: str | None = None
) -> ModelDef:
    """The model the factory `ref` builds for this data, keyed by the scenario seed."""
    factory = resolve(ref, import_dir)

    def rebuild(key: jax.Array) -> Any:
        return factory(n_features, n_classes, key)

    built = _user_call("the factory", rebuild, jax.random.PRNGKey(seed))
    return adapt(built, n_features, rebuild)


def check_model(model: ModelDef, n_features: int, n_classes: int) -> None:
    """Shape-check `model` without running it (`jax.eval_shape`): init gives float
    leaves, apply maps x [batch, n_features] float32 to logits [batch, n_classes]."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    params = _user_call("init", jax.eval_shape, model.init, key)
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise CustomError("init returns no parameters")
    bad = sorted(
        {str(leaf.dtype) for leaf in leaves if not jnp.issubdtype(leaf.dtype, jnp.floating)}
    )
    if bad:
        raise CustomError(f"init returns non-float parameters ({', '.join(bad)})")
    for batch in _CHECK_BATCHES:
        x = jax.ShapeDtypeStruct((batch, n_features), jnp.float32)
        out = _user_call("apply", jax.eval_shape, model.apply, params, x)
        shape = getattr(out, "shape", None)
        if shape != (batch, n_classes) or not jnp.issubdtype(out.dtype, jnp.floating):
            got = f"shape {shape}" if shape is not None else type(out).__name__
            raise CustomError(
                f"apply must return float logits [batch, n_classes] = {[batch, n_classes]} "
                f"for x [{batch}, {n_features}], got {got}"
            )


# -- the exported programs' key --------------------------------------------------------

_LIBRARIES = ("flax", "equinox")  # their versions shape the adapted programs


def identity(ref: Ref, import_dir: str | None = None) -> dict[str, Any] | None:
    """What identifies the factory's programs in the exported-program key, or None when
    nothing can (a lambda, a closure, an object without a module file): such a model is
    never exported, so two models can never share a stored program.

    The identity is the factory's `module:qualname` and a digest of the source of every
    loaded module of its package (of its own file, for a top-level module).
    """
    f = resolve(ref, import_dir)
    module_name, qualname = getattr(f, "__module__", None), getattr(f, "__qualname__", None)
    if not module_name or not qualname or "<" in qualname:
        return None
    module = sys.modules.get(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    file = getattr(module, "__file__", None)
    if obj is not f or file is None:
        return None
    top = module_name.split(".")[0]
    files = {Path(file)}
    for name, m in list(sys.modules.items()):
        path = getattr(m, "__file__", None)
        if (name == top or name.startswith(f"{top}.")) and path:
            files.add(Path(path))
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(str(path.name).encode())
        h.update(path.read_bytes())
    versions = {
        lib: getattr(sys.modules[lib], "__version__", "?")
        for lib in _LIBRARIES
        if lib in sys.modules
    }
    return {"factory": f"{module_name}:{qualname}", "source": h.hexdigest(), "versions": versions}
