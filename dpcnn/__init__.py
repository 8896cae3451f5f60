"""dpcnn: a convolutional network in NumPy, trained data-parallel over MPI."""

__version__ = "0.1.0"
