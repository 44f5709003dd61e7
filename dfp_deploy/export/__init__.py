"""ONNX export of a PyTorch CNN and the checks every exported graph must pass."""
