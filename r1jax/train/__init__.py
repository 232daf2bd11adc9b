"""Training: optimizer, checkpoints, metrics, losses, GRPO loss math, loop guards, the SFT
and GRPO loops, and held-out evaluation. Imports nothing from r1jax/run/."""
