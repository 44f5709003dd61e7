"""dfp-deploy: data-free pruning and quantization of PyTorch CNNs, exported to measured deployment engines."""

__version__ = "0.1.0"
