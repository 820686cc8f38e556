"""Process set-up that must happen before JAX is imported: one thread, shared compile cache."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"


def limit_threads() -> None:
    """Ask XLA and BLAS for one thread so many peers share the cores fairly.

    XLA still starts some threads of its own; the launcher's CPU pinning is what
    actually bounds a peer to its core.
    """
    os.environ.setdefault("XLA_FLAGS", ONE_THREAD_FLAGS)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def compile_cache_dir() -> Path:
    """Where peers share compiled XLA programs (`P2PFL_CACHE` overrides)."""
    base = os.environ.get("P2PFL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "p2pfl"
    )
    return Path(base) / "jax"


def enable_compile_cache() -> None:
    """Turn on JAX's persistent compilation cache so the 2nd..Nth peer skip compiling."""
    import jax

    path = compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def die(logger: Any) -> None:
    """An injected crash (`[faults] crash`): SIGKILL, no clean-up, as a power cut would."""
    logger.warning("crash_injected")
    os.kill(os.getpid(), signal.SIGKILL)
