"""megatron-prefpack: preference packing for Megatron-Core.

A prompt is computed once and shared by all of its responses; many such groups fill one
fixed-length row. See ``megatron_prefpack.data.layout`` for the row contract.
"""

__version__ = "0.1.0"
