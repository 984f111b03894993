"""Pallas GPU kernels for ConvRot: fused rotate+quantize, and the W4A4 GEMM (Hopper, Mosaic GPU)."""
