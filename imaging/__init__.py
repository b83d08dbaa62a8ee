"""IDX reading and MNIST-style image normalisation: numpy and Pillow only.

Training, the server and the client all import this package, so what training
measures is exactly what the server does.
"""
