"""Triton kernels, pure-torch references, backend dispatch, the per-machine record and timing primitives."""
