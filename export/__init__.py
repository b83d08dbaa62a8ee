"""Export stage: checkpoint -> ONNX fp32 -> int8 -> gate -> models/. Importing this package imports nothing heavy."""
