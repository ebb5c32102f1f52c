"""Megatron-Core model builders with prefix-shared attention; presets from tiny to A.X K1."""
