"""Surviving interruptions: stop requests (signals, time limit) and guards against bad steps."""
