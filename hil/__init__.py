"""hil: hardware-in-the-loop for hybrid optical neural networks."""

__version__ = "0.1.0"
