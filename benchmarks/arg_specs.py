"""The named FLUX shapes now live in pallas_kernels/shapes.py (shared by the tests and the
benchmarks); this name stays for old imports."""

from pallas_kernels.shapes import FLUX_LINEAR_SHAPES, FLUX_TOKEN_COUNTS  # noqa: F401
