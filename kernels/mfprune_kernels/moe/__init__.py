"""Fused SwiGLU mixture-of-experts: slot alignment, the Triton kernels, the PyTorch reference."""
