"""Compute-time models. For now a roofline of the hardware profile (:mod:`.roofline`);
measured kernel tables come later."""
