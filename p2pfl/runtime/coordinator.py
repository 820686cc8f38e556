"""The coordinator process: the FedAvg server (centralized) or the bootstrap registry (gossip).

`run_coordinator` runs the role its plan names: a `ServerPlan` serves a centralized
session (`p2pfl.runtime.server`), a `BootstrapPlan` answers a gossip run's hellos
(`p2pfl.runtime.bootstrap`). Importing this module loads no JAX: only serving does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p2pfl.runtime.bootstrap import run_bootstrap
from p2pfl.runtime.server import SessionAbortedError, run_server

if TYPE_CHECKING:
    from p2pfl.config.plan import BootstrapPlan, ServerPlan

__all__ = ["SessionAbortedError", "run_coordinator"]


def run_coordinator(plan: ServerPlan | BootstrapPlan) -> None:
    """Run the coordinator's role to the end; sockets closed even on error.

    Raises:
        SessionAbortedError: the server gave up (too few peers); they were told why.
    """
    if plan.run.mode == "centralized":
        run_server(plan)  # type: ignore[arg-type]
    else:
        run_bootstrap(plan)  # type: ignore[arg-type]
