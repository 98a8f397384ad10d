"""Training: the engine (step, optimizer, checkpoints, metrics, progress) of one worker."""
