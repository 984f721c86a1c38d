"""Triton kernels (one file per op), shipped as distillkit.kernels. Launchers only; no dispatch here."""
