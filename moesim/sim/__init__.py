"""The simulation, stage by stage: inputs (``prepare``), routing (``replay``, ``routing``,
``counts``), the program of ops (``program``), the event loop and its fabric (``engine``,
``fabric``, ``aggregate``, ``flows``), and metrics (``metrics``, ``stragglers``)."""
