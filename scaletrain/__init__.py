"""scaletrain: pretraining of Llama-style language models from one CPU core to thousands of GPUs."""

import warnings

__version__ = "0.1.0"

# Two warnings every CPU run would print, with nothing for a user to act on: megatron-core
# warns at import that Transformer Engine/Apex are absent (expected off-GPU), and DeepSpeed
# still calls collectives torch has renamed. Filtered here so that no import order matters.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
