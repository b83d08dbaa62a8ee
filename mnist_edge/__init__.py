"""mnist-edge: MNIST from PyTorch training to an int8 ONNX model served over gRPC."""

__version__ = "0.2.0"
