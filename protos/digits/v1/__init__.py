"""DigitClassifier v1 (protobuf package ``digits.v1``)."""
