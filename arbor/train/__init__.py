"""Training: the bootstrap SFT, the critics, and the policy objectives (step-DPO, Tree-GRPO, SFT-best)."""
