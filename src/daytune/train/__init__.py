"""Training: LoRA through PEFT in a plain loop with a wall-clock budget, atomic checkpoints and resume."""
