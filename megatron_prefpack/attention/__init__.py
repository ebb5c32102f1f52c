"""Prefix-shared core attention for the layout of ``megatron_prefpack.data.layout``."""
