"""hawq: Hessian-aware mixed-precision quantization (the algorithm, usable alone)."""

__version__ = "0.1.0"
