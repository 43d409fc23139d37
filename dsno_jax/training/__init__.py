"""Training: state and EMA, losses, objectives, the jitted step, the loop, checkpoints, the two runs."""
