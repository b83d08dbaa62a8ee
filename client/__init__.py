"""Client library for the native API and health: grpcio, protobuf and numpy only.

Deliberately not importing the Open Inference Protocol modules: they define the
protobuf package `inference`, as tritonclient does, and the two cannot share a process.
"""

from mnist_edge.client.client import ClientError, DigitClient, Prediction

__all__ = ["ClientError", "DigitClient", "Prediction"]
