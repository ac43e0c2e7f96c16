"""Training: optimizer, sharded train state, the jitted train step, checkpoints, the loop."""
