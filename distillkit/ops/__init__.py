"""Ops: autograd Functions and backend dispatch (cuda ext > triton > cpu ext > reference)."""
