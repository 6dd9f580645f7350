"""memfit: fit PyTorch training in less memory at the least cost in time."""

__version__ = "0.1.0"
