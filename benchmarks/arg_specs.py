"""Named real-world shapes shared by the tests and the benchmarks: they live in pallas_kernels."""

from pallas_kernels.shapes import FLUX_LINEAR_SHAPES, FLUX_TOKEN_COUNTS  # noqa: F401
