"""Triton kernels, pure-torch references, backend dispatch and benchmarks."""
