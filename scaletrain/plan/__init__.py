"""Capacity planning: FLOPs, memory and layouts computed from a config alone."""
