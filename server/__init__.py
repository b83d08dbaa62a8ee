"""The gRPC inference server: onnxruntime on CPU. Imports neither torch nor onnx."""
