"""Training: state, optimiser, sharded train steps, checkpoints, metric writing."""
