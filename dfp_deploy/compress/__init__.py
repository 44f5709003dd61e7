"""Compression: channel importance, prune plans and physical pruning (reconstruction, quantization: other modules)."""
