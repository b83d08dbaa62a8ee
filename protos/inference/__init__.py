"""Open Inference Protocol (KServe v2) messages as defined by Triton r23.12.

Protobuf package ``inference``: do not import this in a process that also
imports tritonclient (both register the same message names).
"""
