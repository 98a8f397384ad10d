"""Training: data, launcher, trainer loop, optimizer, checkpoints, metrics."""
