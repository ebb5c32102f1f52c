"""Config, the ``prefpack train`` loop, reference log-probs and checkpoints."""
