"""Run Megatron-Core on CPU over gloo (tests and the CPU demo). Never activated on GPU."""
