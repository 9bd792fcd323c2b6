"""scaletrain: pretraining of Llama-style language models from one CPU core to thousands of GPUs."""

__version__ = "0.1.0"
