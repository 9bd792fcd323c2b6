"""Turning a config into processes: torchrun here, SLURM later."""
