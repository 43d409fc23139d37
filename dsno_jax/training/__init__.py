"""Training: state and EMA, losses, sharding, the loop, orbax checkpoints."""
