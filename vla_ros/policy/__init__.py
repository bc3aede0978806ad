"""The OpenVLA model, its fast engine, quantization and the tiny checkpoints used by tests (torch)."""
