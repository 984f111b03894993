"""`convrot-demo`: ConvRot on one random FLUX-shaped linear layer, no downloads.

Quantizes a random 3072 -> 12288 layer (FLUX's MLP up-projection) and runs 512 tokens of
activations drawn with diffusion-transformer outliers through it: prints the output error of
bf16, naive W4A4 and ConvRot W4A4 against float32, and the weight memory of each.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import convrot_jax as cj
from convrot_jax.quant import sqnr_db
from convrot_jax.synthetic import outlier_activations


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--in-features", type=int, default=3072)
    parser.add_argument("--out-features", type=int, default=12288)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    kw, kx = jax.random.split(jax.random.PRNGKey(args.seed))
    w = jax.random.normal(kw, (args.out_features, args.in_features)) * 0.02
    x = outlier_activations(kx, args.tokens, args.in_features, token_outliers=False)
    exact = x @ w.T

    rows = []
    bf16 = (x.astype(jnp.bfloat16) @ w.T.astype(jnp.bfloat16)).astype(jnp.float32)
    rows.append(("bf16 (baseline)", sqnr_db(exact, bf16), w.size * 2))
    for name, settings in [
        ("W4A4 naive (no rotation)", dict(hadamard="none")),
        ("W4A4 ConvRot, regular Hadamard 256", dict(hadamard="regular", group_size=256)),
        ("W4A4 ConvRot + per-group scales (64)", dict(hadamard="regular", group_size=256, scale_group=64)),
    ]:
        layer = cj.ConvDense4bit.from_linear(w, **settings)
        y = jax.jit(lambda m, x: m(x))(layer, x.astype(jnp.bfloat16)).astype(jnp.float32)
        rows.append((name, sqnr_db(exact, y), layer.qweight.nbytes))

    print(f"Layer {args.in_features} -> {args.out_features}, {args.tokens} tokens with channel outliers, "
          f"on {jax.devices()[0].platform}")
    print(f"{'variant':40s} {'SQNR vs fp32':>13s} {'rel. L2 err':>12s} {'weight MiB':>11s} {'vs bf16':>8s}")
    for name, db, nbytes in rows:
        print(f"{name:40s} {db:10.1f} dB {10 ** (-db / 20):12.4f} {nbytes / 2**20:11.2f} "
              f"{rows[0][2] / nbytes:7.2f}x")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
