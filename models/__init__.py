"""From-scratch ViT and LLaMA-family models whose parameter names match the HF checkpoints."""
