"""Engine backends (ONNX Runtime, PyTorch, TensorRT) behind one registry; each is imported only when asked for."""
