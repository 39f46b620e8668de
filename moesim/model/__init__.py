"""Model shapes (presets) and, later, the reference torch MoE."""
