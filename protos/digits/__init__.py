"""mnist-edge native device API (protobuf package ``digits``)."""
