"""Synthetic activations with the outlier structure of diffusion transformers, for demos,
tests and quality benchmarks (no model weights are needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def outlier_activations(
    key: jax.Array,
    m: int,
    k: int,
    *,
    channel_outliers: bool = True,
    token_outliers: bool = True,
    dtype=jnp.float32,
) -> jnp.ndarray:
    """Activations with the outlier structure seen in diffusion transformers.

    Base: i.i.d. N(0, 1). Channel outliers: max(1, K/512) channels scaled by factors log-uniform
    in [10, 100] (every token is large there). Token outliers: max(1, M/128) tokens replaced by a
    large shared offset, f * (1 + 0.5 N(0, 1)) with f log-uniform in [10, 50]: a row-wise outlier
    with a strong mean, the case where Sylvester's all-ones column piles sqrt(n) * f into one
    channel of every group while the regular Hadamard spreads it evenly.
    """
    k_base, k_ch, k_chf, k_tok, k_tokf, k_tokn = jax.random.split(key, 6)
    x = jax.random.normal(k_base, (m, k), jnp.float32)
    if channel_outliers:
        n_ch = max(1, k // 512)
        channels = jax.random.choice(k_ch, k, (n_ch,), replace=False)
        factors = jnp.exp(jax.random.uniform(k_chf, (n_ch,), minval=jnp.log(10.0), maxval=jnp.log(100.0)))
        x = x.at[:, channels].multiply(factors)
    if token_outliers:
        n_tok = max(1, m // 128)
        tokens = jax.random.choice(k_tok, m, (n_tok,), replace=False)
        f = jnp.exp(jax.random.uniform(k_tokf, (n_tok, 1), minval=jnp.log(10.0), maxval=jnp.log(50.0)))
        x = x.at[tokens].set(f * (1 + 0.5 * jax.random.normal(k_tokn, (n_tok, k))))
    return x.astype(dtype)
