"""The simulation: routing arithmetic, network and compute times, and the SimPy engine."""
