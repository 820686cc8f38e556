"""The trainer's programs as exported StableHLO, so that a peer does not trace the model.

Tracing and lowering a peer's init, train and evaluate programs costs it about 0.25 s
of CPU even when their XLA executables come from the persistent compile cache: on two
cores, 64 peers pay 8 s for it. A launch's precompile step traces them once instead,
`jax.export`s them for the scenario's shapes and writes them (StableHLO bytes in a
flatbuffer, never a pickle) into a folder of the compile cache. Each peer reads them
back and calls `Exported.call` under `jax.jit`: a lowering of a few milliseconds, then
the executable from the persistent cache (the precompile step compiled these very
wrappers, so their cache keys match).

A program is found by a key over everything that shapes it: the model and training
settings, the argument shapes and dtypes, the platform, the JAX and optax versions and
this package's learning source (the code that defines the functions). A missing or
unreadable program, or a call with other arguments (other shapes, under `vmap` or
`jit`), is served by the traced function instead: the programs only ever save time.

Programs are exported over flat argument and result lists (optax states are pytrees
jax.export cannot name); the caller's pytrees are flattened and rebuilt around them.
The same folder keeps plain arrays (`save_results`, npz without pickle) that are pure
functions of their key: each peer's initial state, so that no peer loads the init
program, and the parsed bundled datasets.

The learning source in the key covers the built-in models; a model defined elsewhere
would have to bring its own source into the settings.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export

# Why a program is stored or looked up: the settings that shape it, JSON-serialisable.
Settings = Mapping[str, Any]
Traced = Callable[[], Callable[..., Any]]  # the traced function, built when first needed

FOLDER = "p2pfl-exported"
_LEARNING = Path(__file__).resolve().parent  # the code behind the programs


def store() -> Path | None:
    """Where programs are kept: a folder of JAX's persistent compile cache, if one is on."""
    cache = jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]
    return Path(cache) / FOLDER if cache else None


@functools.cache
def _source_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(_LEARNING.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _versions() -> dict[str, str]:
    import jaxlib
    import optax

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "optax": optax.__version__}


def _aval(x: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of an array, a `jax.ShapeDtypeStruct` or a Python scalar."""
    dtype = x.dtype if hasattr(x, "dtype") else np.result_type(x)
    return tuple(np.shape(x)), str(np.dtype(dtype))


def _avals(leaves: Sequence[Any]) -> list[tuple[tuple[int, ...], str]]:
    return [_aval(x) for x in leaves]


def key(settings: Settings, name: str, args: tuple[Any, ...]) -> str:
    """The key of program `name` of `settings` for arguments shaped like `args`."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    described = {
        "settings": settings,
        "name": name,
        "args": [str(tree), _avals(leaves)],
        "platform": jax.default_backend(),
        "x64": str(jax.dtypes.canonicalize_dtype(np.float64)),
        "versions": _versions(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("JAX_")},
        "source": _source_digest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def data_key(settings: Settings) -> str:
    """The key of data derived from `settings` by this package's learning code alone
    (no program: no platform or JAX version in it, and no JAX backend started)."""
    described = {"settings": settings, "source": _source_digest()}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def export_flat(fn: Callable[..., Any], args: tuple[Any, ...]) -> export.Exported:
    """`fn` exported for arguments shaped like `args` (arrays or `jax.ShapeDtypeStruct`s),
    taking and returning flat lists of arrays."""
    leaves, tree = jax.tree_util.tree_flatten(args)

    def flat(*xs: Any) -> tuple[Any, ...]:
        return tuple(jax.tree_util.tree_leaves(fn(*jax.tree_util.tree_unflatten(tree, xs))))

    specs = [jax.ShapeDtypeStruct(*_aval(x)) for x in leaves]
    return export.export(jax.jit(flat))(*specs)


def save(folder: Path, k: str, program: export.Exported) -> None:
    """Write `program` under key `k` atomically (concurrent writers leave one whole file)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{k}.{os.getpid()}.tmp"
    tmp.write_bytes(program.serialize())
    tmp.replace(folder / k)


def load(folder: Path | None, k: str) -> export.Exported | None:
    """The program stored under key `k`, or None when there is none or it does not read."""
    if folder is None:
        return None
    try:
        return export.deserialize(bytearray((folder / k).read_bytes()))
    except Exception:  # a missing or damaged entry only means tracing
        return None


def save_results(folder: Path, k: str, leaves: Sequence[Any]) -> None:
    """Write a program's results (its flat list of arrays) under key `k`, atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{k}.{os.getpid()}.tmp.npz"
    np.savez(tmp, *[np.asarray(x) for x in leaves])
    tmp.replace(folder / f"{k}.npz")


def load_results(folder: Path | None, k: str) -> list[np.ndarray] | None:
    """The results stored under key `k` (no pickle), or None."""
    if folder is None:
        return None
    try:
        with np.load(folder / f"{k}.npz", allow_pickle=False) as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]
    except Exception:  # a missing or damaged entry only means running init
        return None


def committed(tree: Any) -> Any:
    """`tree`'s arrays committed to the default device (no copy when they are there):
    how a `Program` takes its arguments, so that ones placed once are not placed again
    at every call."""
    return jax.device_put(tree, jax.local_devices()[0])


class Program:
    """A jitted function served by an exported program for the one argument signature it
    was exported for, and by the traced function for any other (or for all, without a
    program).

    Callable like the function, and `lower(...)` like a `jax.jit` function.
    """

    def __init__(
        self,
        traced: Traced,
        program: export.Exported | None = None,
        args: tuple[Any, ...] = (),
        out_tree: Any = None,
    ) -> None:
        self._traced = traced
        self._in_tree = jax.tree_util.tree_structure(args)
        ins = [] if program is None else program.in_avals
        self._specs = [(tuple(a.shape), np.dtype(a.dtype)) for a in ins]  # shape, dtype
        self._out_avals = [] if program is None else list(program.out_avals)
        self._out_tree = out_tree
        self._call = None if program is None else jax.jit(program.call)
        self._device = jax.local_devices()[0]  # where a single-device program runs

    def _flat(self, args: tuple[Any, ...]) -> list[Any] | None:
        """`args` as the program's flat arguments, or None when they do not fit it.

        Python scalars and host arrays are converted as `jax.jit` would convert them.
        Every argument is committed to the device (no copy for one already there): the
        program's results are committed, and a jitted function keeps one executable per
        placement of its arguments, so mixed placements would load the program again.
        """
        if self._call is None:
            return None
        leaves, tree = jax.tree_util.tree_flatten(args)
        if tree != self._in_tree:  # type: ignore[operator]
            return None
        flat: list[Any] = []
        moves: list[int] = []  # positions to commit to the device
        for x, (shape, dtype) in zip(leaves, self._specs, strict=True):
            if isinstance(x, jax.Array):
                if isinstance(x, jax.core.Tracer) or x.shape != shape or x.dtype != dtype:
                    return None
                if not x.committed:
                    moves.append(len(flat))
                flat.append(x)
                continue
            host = np.asarray(x)
            if host.shape != shape or jax.dtypes.canonicalize_dtype(host.dtype) != dtype:
                return None
            moves.append(len(flat))
            flat.append(host.astype(dtype, copy=False))
        if moves:
            placed = jax.device_put([flat[i] for i in moves], self._device)
            for i, x in zip(moves, placed, strict=True):
                flat[i] = x
        return flat

    def serves(self, *args: Any) -> bool:
        """Whether a call with `args` runs the exported program (not the traced function)."""
        return self._flat(args) is not None

    def results(self, leaves: Sequence[np.ndarray]) -> Any | None:
        """`leaves` (stored results of this program) on the device as its result pytree,
        or None when they are not shaped like its results."""
        if self._call is None or _avals(leaves) != _avals(self._out_avals):
            return None
        placed = jax.device_put(list(leaves), self._device)  # committed, as results are
        return jax.tree_util.tree_unflatten(self._out_tree, placed)

    def __call__(self, *args: Any) -> Any:
        flat = self._flat(args)
        if flat is None:
            return self._traced()(*args)
        assert self._call is not None
        return jax.tree_util.tree_unflatten(self._out_tree, self._call(*flat))

    def lower(self, *args: Any) -> Any:
        """As `jax.jit(f).lower`: the program's wrapper when `args` fit it."""
        flat = self._flat(args)
        if flat is None:
            return self._traced().lower(*args)  # type: ignore[attr-defined]
        assert self._call is not None
        return self._call.lower(*flat)


def stored_or_exported(
    settings: Settings | None,
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    out_tree: Any,
) -> Callable[..., Any]:
    """`jax.jit(fn)` served by its exported program for calls shaped like `args`: read
    from the store, or exported and stored now (the simulator's batched programs, which
    no precompile step exports). `jax.jit(fn)` itself without settings or a store.

    On a miss the program is traced once, for the export, and only its wrapper is ever
    compiled: a cold run compiles each program once, as `jax.jit(fn)` would.
    """
    folder = store()
    traced = functools.cache(lambda: jax.jit(fn))
    if settings is None or folder is None:
        return traced()
    served = serve(settings, name, args, out_tree, traced, folder)
    if served is not None:
        return served
    program = export_flat(fn, args)
    save(folder, key(settings, name, args), program)
    return Program(traced, program, args, out_tree)


def serve(
    settings: Settings,
    name: str,
    args: tuple[Any, ...],
    out_tree: Any,
    traced: Traced,
    folder: Path | None,
) -> Program | None:
    """Program `name` for `args` from `folder`, or None when it is not there or its
    results do not have `out_tree`'s number of leaves."""
    program = load(folder, key(settings, name, args))
    if program is None or len(program.out_avals) != out_tree.num_leaves:
        return None
    return Program(traced, program, args, out_tree)
