"""Compute times and memory: the work model of each op (:mod:`.work`), the cost model
that times ops from measured kernel tables or the hardware profile's roofline
(:mod:`.model`), the times of a layer's non-expert parts on the profile's roofline
(:mod:`.roofline`), and device memory (:mod:`.memory`)."""
