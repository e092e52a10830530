"""Hand-written Triton kernels, one op per file, each with a plain PyTorch reference beside it."""
