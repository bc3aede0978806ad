"""The OpenVLA model, its fast engine, quantization and the tiny test checkpoints (torch)."""
