"""Eager PyTorch formulas written from the papers; every backend is tested against these in float64."""
