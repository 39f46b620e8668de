"""Kernel timings: micro-benchmarks of MoE kernels (:mod:`.bench`), their measured tables
(:mod:`.tables`) and import of profiler traces (:mod:`.profile_import`).

Submodules are imported on use; ``torch`` is only needed by :mod:`.bench`.
"""
