"""Device time of a jitted op on the GPU (CUPTI), shared by the kernel benchmarks."""

from __future__ import annotations

import math
import statistics
import time

import jax

ITERS = 20
L2_ROTATE_BYTES = 120e6  # more than twice the H100's 50 MB L2


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def device_time_ms(fn, make_args, out_bytes: int = 0) -> float:
    """Median device time (ms) of fn(*args) over ITERS iterations. Each iteration runs fn on
    several distinct input sets (make_args(i), together > 2x L2) and the time is divided by their
    number, so no run finds its inputs in L2. Device time is the sum of the kernels' CUPTI times
    (no launch gaps); without CUPTI, the host clock around synchronised calls."""
    first = make_args(0)
    n_sets = int(min(8, max(2, math.ceil(L2_ROTATE_BYTES / (_nbytes(first) + out_bytes)))))
    sets = [first] + [make_args(i) for i in range(1, n_sets)]
    f = jax.jit(lambda sets: [fn(*s) for s in sets])
    from jax.experimental.mosaic.gpu import profiler

    try:
        _, times = profiler.measure(f, iterations=ITERS)(sets)
    except RuntimeError:
        times = None
    if not times:
        jax.block_until_ready(f(sets))
        times = []
        for _ in range(ITERS):
            t = time.perf_counter()
            jax.block_until_ready(f(sets))
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times) / n_sets
