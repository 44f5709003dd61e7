"""Weight quantization: the round-to-nearest grid, Hessian-aware rounding and bias correction."""
