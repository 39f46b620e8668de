"""The simulation, stage by stage: inputs (``prepare``, ``cluster``), routing (``replay``,
``routing``, ``counts``), the program of ops (``program``, ``allreduce``), the event loop
and its fabric (``engine``, ``fabric``, ``transfers``, ``flows``), and metrics
(``metrics``, ``stragglers``)."""
