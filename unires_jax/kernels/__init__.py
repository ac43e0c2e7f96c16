"""Kernels with a plain-XLA reference beside them, dispatched by config."""
