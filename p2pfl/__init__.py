"""p2pfl: decentralised federated learning; JAX peers gossip-average over ZeroMQ.

The public surface is re-exported here. It stays import-light on purpose: every name
is imported from its module on first use, so JAX, matplotlib and rich load only when a
run starts, and the scenario schema only when a scenario is read.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from p2pfl.app.api import Comparison, Result, compare, launch, load_run, simulate
    from p2pfl.config.loader import load as load_scenario
    from p2pfl.config.schema import Scenario, ScenarioError

__version__ = "0.1.0"

# name -> (module, attribute): imported on first use, so that `import p2pfl` (every
# peer's and the console script's first step) costs nothing until something is asked for
_LAZY = {
    "load_scenario": ("p2pfl.config.loader", "load"),
    "Scenario": ("p2pfl.config.schema", "Scenario"),
    "ScenarioError": ("p2pfl.config.schema", "ScenarioError"),
    **{
        name: ("p2pfl.app.api", name)
        for name in ("simulate", "launch", "compare", "load_run", "Result", "Comparison")
    },
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its module when first asked for."""
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'p2pfl' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names, the lazily imported ones included."""
    return sorted({*globals(), *_LAZY})


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
