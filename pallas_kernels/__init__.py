"""Pallas Mosaic GPU kernels for ConvRot (Hopper): the fused rotate+quantize, the W4A4 GEMM, the
W4A16 (weight-only int4) GEMM, the LoRA down-projection with a GELU prologue and the attention
kernels.

A leaf package: it imports only jax, numpy and its own modules (`convrot_jax` imports it, never
the other way). One op per module, its config and reference beside it; `int4_unpack` holds the
register-level int4 unpack both GEMMs use, `rounding` the int4 recipe that the kernels and
convrot_jax's XLA reference share bit for bit, `shapes` the FLUX.1 linear shapes the kernels are
tuned and tested on.
"""
