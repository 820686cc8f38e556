"""Process set-up that must happen before JAX is imported: one thread, shared compile
cache, and (for the simulator) glibc's allocator tuned for large arrays."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

ONE_THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false"

# glibc tunables for a process that makes and frees many `[peers, d]` arrays (the
# simulator): transparent huge pages for malloc's memory (fewer TLB misses and page
# faults on large stacks), and a fixed mmap threshold, so that a buffer of 8 MiB or
# more goes back to the OS when freed instead of fragmenting a heap that only grows
# (glibc's dynamic threshold rises to the largest buffer freed, up to 32 MiB)
ALLOCATOR_TUNABLES = {"glibc.malloc.hugetlb": "1", "glibc.malloc.mmap_threshold": "8388608"}
NO_TUNING = "P2PFL_MALLOC_TUNING"  # = "0": leave the allocator as it is
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """This process's glibc version, or None when its C library is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # type: ignore[union-attr]
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def thp_available() -> bool:
    """Whether the kernel gives transparent huge pages to a region that asks for them."""
    try:
        mode = _THP.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def allocator_env(
    env: Mapping[str, str], glibc: tuple[int, int] | None, huge_pages: bool
) -> dict[str, str] | None:
    """`env` with `ALLOCATOR_TUNABLES` added to `GLIBC_TUNABLES` (a tunable already set
    there is left as it is), or None when there is nothing to do: every one is set, the
    user opted out (`P2PFL_MALLOC_TUNING=0`), glibc is older than 2.35 (no `hugetlb`) or
    absent, or the kernel has huge pages off (the fixed threshold alone costs time)."""
    if env.get(NO_TUNING) == "0" or glibc is None or glibc < (2, 35) or not huge_pages:
        return None
    current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    named = {t.split("=", 1)[0] for t in current}
    missing = [f"{k}={v}" for k, v in ALLOCATOR_TUNABLES.items() if k not in named]
    if not missing:
        return None
    return {**env, "GLIBC_TUNABLES": ":".join([*current, *missing])}


def tune_allocator() -> None:
    """Re-execute this process's command line under `allocator_env` (glibc reads its
    tunables only when a process starts); returns when there is nothing to do. Call it
    before anything heavy is imported: the new process repeats all that came before."""
    env = allocator_env(os.environ, glibc_version(), thp_available())
    if env is not None:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def quick_exit(code: int) -> NoReturn:
    """End the process with `code` once its outputs are out, skipping the interpreter's
    teardown: with JAX and matplotlib loaded that is ~0.45 s here (the module graph,
    XLA's thread pools), a fifth of a small simulated run. For a command whose every
    file is closed by the time it returns; the standard streams and logging are
    flushed here."""
    import logging

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)


# Imported once by the launcher's forkserver and shared by every forked peer: the roles'
# modules, and what JAX imports lazily on a peer's first lowering (MLIR dialect
# bindings; scipy's LAPACK, which calling an exported program loads). Imports only: no
# JAX backend may start before the fork (XLA's threads do not survive it). A name that
# does not import is skipped by the forkserver.
PRELOAD = [
    "p2pfl.runtime.roles",
    "p2pfl.runtime.logs",
    "p2pfl.runtime.peer",
    "p2pfl.runtime.client",
    "p2pfl.runtime.coordinator",
    "p2pfl.app.launch",
    "jaxlib.mlir.dialects.mhlo",
    "jaxlib.mlir.dialects.builtin",
    "jaxlib.mlir.extras.meta",
    "jax.experimental.multihost_utils",
    "scipy.linalg",
]


def start_forkserver() -> Any:
    """The forkserver context peers are forked from, its server started (once) with
    `PRELOAD` and one-thread XLA settings, which it and every peer inherit.

    Starting it returns at once: the server imports `PRELOAD` (~0.6 s) while the caller
    goes on, so the console script starts it before its own imports.
    """
    import multiprocessing
    from multiprocessing import forkserver

    limit_threads()
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
    return ctx


@dataclass(frozen=True)
class Distributed:
    """One process of a simulation spread over several (`jax.distributed`): every one
    runs the same command with its own `process_id`."""

    coordinator_address: str  # "host:port" of process 0, reachable by every process
    num_processes: int
    process_id: int

    def __post_init__(self) -> None:
        if self.num_processes < 2 or not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"process id {self.process_id} of {self.num_processes} processes: need "
                "at least 2 processes and 0 <= id < processes"
            )


def join(d: Distributed) -> None:
    """Join the run's JAX processes (before any JAX computation). On CPU the processes'
    collectives go over gloo (TCP); GPUs use their own."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(d.coordinator_address, d.num_processes, d.process_id)


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
