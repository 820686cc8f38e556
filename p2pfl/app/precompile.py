"""Compile the steps every peer of a launch shares, once, before the peers start.

All peers of a scenario train and evaluate on padded shards of the same shapes, so
they run the same XLA programs. On a cold compile cache, N peers started together
would all compile them at once (64 peers: minutes on two cores); instead one forked
child traces peer 0's init, train and evaluate programs (and in centralized mode the
server's evaluate), exports them (`p2pfl.learning.exported`: the peers then skip
tracing) and compiles them into the persistent compile cache, and every peer then
loads them from it.

A marker per set of programs (a hash of the settings that shape them, the JAX
versions, XLA flags and the learning layer's source) records a finished
precompile, so a warm launch skips the child altogether: it would only have loaded
from the cache what the peers load anyway. This module imports no JAX itself: the
launcher stays light, and the child runs in the forkserver that has imported it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from p2pfl.config.schema import Scenario
from p2pfl.runtime import process

TIMEOUT_S = 300.0  # longest wait for the compile before the peers start anyway
_PR_SET_PDEATHSIG = 1
_PACKAGE = Path(__file__).resolve().parents[1]
# the code behind the programs: the learning layer, and the gossip step
_SOURCES = [*sorted((_PACKAGE / "learning").glob("*.py")), _PACKAGE / "core" / "mixing.py"]


def marker(s: Scenario) -> Path | None:
    """The file a finished precompile of `s`'s programs leaves, or None when it cannot be
    known ahead (npz data: the shapes depend on each peer's file)."""
    if s.data.dataset == "npz":
        return None
    dump = s.model_dump(mode="json")
    dump["training"].pop("rounds")  # how often the programs run, not what they are
    versions: dict[str, str | None] = {}
    for package in ("jax", "jaxlib", "optax"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    settings = {
        "learning": {k: dump[k] for k in ("data", "model", "training", "seed")},
        "peers": s.peers,
        "mode": s.mode,
        "versions": versions,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("XLA_", "JAX_"))},
    }
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in _SOURCES:
        h.update(path.read_bytes())
    return process.compile_cache_dir() / "p2pfl-precompiled" / h.hexdigest()[:32]


def child_main(s: Scenario, core: int, stderr_path: str, done: str | None) -> None:
    """Body of the forked child: compile into the cache, leave the marker, exit at once."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    os.sched_setaffinity(0, {core})  # pinned like a peer, so its compile options are theirs
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    process.enable_compile_cache()
    from p2pfl.config.learning import learning_spec
    from p2pfl.learning import local

    loc = local.export_steps(learning_spec(s), 0, server=s.mode == "centralized")
    _compile_mixing(s, loc.trainer.n_params)
    if done is not None:
        Path(done).parent.mkdir(parents=True, exist_ok=True)
        Path(done).touch()
    sys.stderr.flush()
    os._exit(0)  # skip XLA's teardown, as a finished peer does


def _compile_mixing(s: Scenario, n_params: int) -> None:
    """Compile the gossip step every peer calls after its first round's training (for
    each neighbourhood size of the topology) into the cache, so that on a cold cache
    the peers do not all compile it at once."""
    if s.mode != "gossip":
        return  # the server's FedAvg step stacks however many updates came: not known
    import jax
    import numpy as np

    from p2pfl.core import mixing
    from p2pfl.core.graphs import build_graph

    # "mean" is gossip_step itself; the robust rules run in numpy and report its figure
    step = mixing.gossip_step if s.gossip.aggregator == "mean" else mixing.disagreement
    for k in sorted({d for _, d in build_graph(s.topology, s.seed, s.base_dir).degree()}):
        shapes = ((n_params,), (k, n_params), (k,))
        step.lower(*(jax.ShapeDtypeStruct(x, np.float32) for x in shapes)).compile()


def run(ctx: Any, s: Scenario, core: int, stderr_path: Path) -> bool:
    """Compile `s`'s shared programs in a child of `ctx` (a forkserver context), unless a
    marker says an earlier launch did; False if the child failed.

    A failure is not fatal: each peer then compiles for itself, and reports whatever
    made the set-up fail.
    """
    done = marker(s)
    if done is not None and done.exists():
        return True
    child = ctx.Process(
        target=child_main,
        args=(s, core, str(stderr_path), None if done is None else str(done)),
        name="p2pfl-precompile",
    )
    child.start()
    try:
        child.join(TIMEOUT_S)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    return bool(child.exitcode == 0)
