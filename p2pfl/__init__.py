"""p2pfl: decentralised federated learning; JAX peers gossip-average over ZeroMQ.

Kept import-light on purpose: a peer process pays only for what it uses.
"""

__version__ = "0.1.0"
