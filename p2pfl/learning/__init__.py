"""Learning: datasets, partitioners, JAX models and the optax trainer. Knows no sockets."""
