"""moesim: replay real MoE routing traces through a discrete-event simulation of a cluster."""

__all__ = ["__version__"]

__version__ = "0.1.0"
