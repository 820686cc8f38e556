"""The simulator: every peer of a run in one process, stacked on a leading axis."""
