"""p2pfl: decentralised federated learning; JAX peers gossip-average over ZeroMQ.

The public surface is re-exported here, one name per line. It stays import-light on
purpose: JAX, matplotlib and rich load only in the commands that use them.
"""

from p2pfl.config.loader import load as load_scenario
from p2pfl.config.schema import Scenario as Scenario
from p2pfl.config.schema import ScenarioError as ScenarioError

__version__ = "0.1.0"

__all__ = [
    "Scenario",
    "ScenarioError",
    "__version__",
    "load_scenario",
]
