"""Sharded, atomic checkpoints: manifest, save/verify/load, retention."""
