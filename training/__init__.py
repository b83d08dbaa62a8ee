"""Training stage: data, model, training loop. Importing this package does not import torch."""
