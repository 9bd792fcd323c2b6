"""Hugging Face interop: `export hf` (export.py, command.py) and `model.init_from` (imports.py)."""
