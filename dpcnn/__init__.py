"""dpcnn: a convolutional network in NumPy, trained data-parallel over MPI."""

from .memory import keep_freed_memory

__version__ = "0.1.0"

#: Whether glibc keeps freed memory for reuse in this process (`dpcnn.memory`).
MALLOC_TUNED = keep_freed_memory()
