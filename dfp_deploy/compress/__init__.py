"""Compression: channel importance, prune plans, physical pruning (and, from other modules, reconstruction and quantization)."""
