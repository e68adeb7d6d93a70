"""dpcam: differential privacy meets interpretability, as a reproducible MLOps study."""

__version__ = "0.1.0"
