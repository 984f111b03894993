"""One-process GPU check of the W4A4 GEMM's gated-residual epilogue at FLUX shapes: error against
the XLA reference (in bf16 ulps; <= 1 passes), then device time (CUPTI) of the fused epilogue
against the kernel followed by XLA's `residual + gate * y` (FLUX's unfused form).

    PYTHONPATH=. python3 tools/gpu_check_gated_residual.py            # H200 / H100
    PYTHONPATH=. python3 tools/gpu_check_gated_residual.py --smoke    # CPU, interpret mode, tiny
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import device_time_ms
from pallas_kernels.rounding import pack_int4
from pallas_kernels.w4a4_matmul import w4a4_matmul
from pallas_kernels.w4a4_matmul_config import W4A4MatmulConfig
from pallas_kernels.w4a4_matmul_reference import w4a4_matmul_reference

# (images, tokens per image, K, N): FLUX's gated sites at 1024² and 512² (text: 512 tokens).
# Registers form (M >= 4608 per table row; 4096 tokens take it too), its split tail (K = 12288), the
# smem form with split tails (few tiles), two images.
CHECK = [(1, 4096, 3072, 3072), (2, 4096, 12288, 3072), (1, 512, 3072, 3072), (2, 1536, 15360, 3072)]
TIME = [(1, 4096, 3072, 3072), (1, 4608, 15360, 3072), (1, 512, 3072, 3072)]


def operands(i: int, images: int, tokens: int, k: int, n: int):
    ks = jax.random.split(jax.random.key(i), 7)
    m = images * tokens
    return jax.block_until_ready((
        jax.random.randint(ks[0], (m, k), -7, 8, jnp.int8),
        jnp.exp(jax.random.normal(ks[1], (m,), jnp.float32)),
        pack_int4(jax.random.randint(ks[2], (n, k), -8, 8, jnp.int8)),
        jnp.exp(jax.random.normal(ks[3], (n,), jnp.float32)) * 0.01,
        jax.random.normal(ks[4], (n,), jnp.bfloat16),
        jax.random.normal(ks[5], (images, n), jnp.bfloat16),
        (jax.random.normal(ks[6], (m, n), jnp.float32) * 4).astype(jnp.bfloat16)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    check, timed, kw = CHECK, TIME, {}
    if args.smoke:
        check, timed = [(3, 10, 512, 256)], []
        kw = dict(interpret=True, config=W4A4MatmulConfig(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=2))
    fused = jax.jit(lambda x, sx, w, sw, b, g, r: w4a4_matmul(x, sx, w, sw, b, gate=g, residual=r, **kw))
    unfused = jax.jit(lambda x, sx, w, sw, b, g, r: r + jnp.repeat(g, r.shape[0] // g.shape[0], 0)
                      * w4a4_matmul(x, sx, w, sw, b, **kw))
    reference = jax.jit(lambda x, sx, w, sw, b, g, r: w4a4_matmul_reference(x, sx, w, sw, b, gate=g, residual=r))
    t0 = time.time()
    for images, tokens, k, n in check:
        ops = operands(0, images, tokens, k, n)
        y, ref = (np.asarray(f(*ops), np.float64) for f in (fused, reference))
        ulp = np.abs(y - ref) / np.maximum(np.abs(ref) * 2.0**-7, 2.0**-20)
        print(f"check B={images} S={tokens} K={k} N={n}: max err {ulp.max():.2f} bf16 ulp, identical "
              f"{np.mean(y == ref):.4f}, finite {np.isfinite(y).all()} ({time.time() - t0:.0f} s)", flush=True)
    for images, tokens, k, n in timed:
        make = functools.partial(operands, images=images, tokens=tokens, k=k, n=n)
        out_bytes = images * tokens * n * 2
        t_unfused = device_time_ms(unfused, make, out_bytes)
        t_fused = device_time_ms(fused, make, out_bytes)
        print(f"time M={images * tokens} K={k} N={n}: unfused (kernel + XLA) {t_unfused * 1e3:.1f} us, "
              f"fused {t_fused * 1e3:.1f} us, {t_unfused / t_fused:.3f}x ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
