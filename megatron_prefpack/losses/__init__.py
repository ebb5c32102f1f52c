"""Per-response log-probs and the DPO family, reward-model and SFT losses."""
