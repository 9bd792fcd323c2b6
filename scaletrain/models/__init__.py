"""Model definitions built from megatron-core tensor-parallel layers."""
