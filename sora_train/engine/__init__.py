"""Training machinery around the model: checkpoints, EMA, metrics."""
