"""p2pfl: decentralised federated learning; JAX peers gossip-average over ZeroMQ.

The public surface is re-exported here, one name per line. It stays import-light on
purpose: JAX, matplotlib and rich load only when a run starts (`simulate`, `launch`,
`compare` and `load_run` are imported on first use).
"""

from typing import Any

from p2pfl.config.loader import load as load_scenario
from p2pfl.config.schema import Scenario as Scenario
from p2pfl.config.schema import ScenarioError as ScenarioError

__version__ = "0.1.0"

_API = ("simulate", "launch", "compare", "load_run", "Result", "Comparison")


def __getattr__(name: str) -> Any:
    """The run functions of `p2pfl.app.api`, imported when first asked for."""
    if name in _API:
        from p2pfl.app import api

        return getattr(api, name)
    raise AttributeError(f"module 'p2pfl' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazily imported run functions included."""
    return sorted({*globals(), *_API})


__all__ = [
    "Comparison",
    "Result",
    "Scenario",
    "ScenarioError",
    "__version__",
    "compare",
    "launch",
    "load_run",
    "load_scenario",
    "simulate",
]
