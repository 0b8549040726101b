"""Training: the engine, the loop, checkpoints, schedules and torchrun support."""
