"""Training machinery: config, LoRA, data, distributed strategies, trainer, checkpoints."""
