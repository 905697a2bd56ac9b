"""Triton kernels for CUDA: absorbed MLA decode over the paged latent cache, and the routed experts as one
grouped GEMM over tokens sorted by expert. Each has a torch reference beside it; CI, which has no GPU, checks
them against it under Triton's interpreter (TRITON_INTERPRET=1 with CPU tensors). `triton` is an optional
dependency (the `gpu` and `dev` extras): import these modules only where it is installed.
"""
