"""Wrapping the model into a DeepSpeed engine."""
