"""Symmetry ensembles: members as batched heads, member transforms, calibration, aggregates."""
