"""Parameter sweeps: a base scenario plus axes over any of its fields (:mod:`.spec`), cases run
on a local process pool or a Dask cluster (:mod:`.run`), each appended to a Parquet results
table as it finishes (:mod:`.results`); the ``moesim sweep`` command (:mod:`.commands`).

Submodules are imported on use, so that ``moesim --help`` stays fast.
"""
