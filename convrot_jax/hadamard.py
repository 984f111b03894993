"""Hadamard matrices and the grouped rotation that ConvRot applies along the input dimension.

The rotation is computed as a butterfly: a group of n = 4^k (regular) or 2^k (Sylvester) values
is viewed as a k-dimensional 4 x 4 x ... x 4 tensor and a 4-point transform is applied along each
axis, outermost axis first, with a fixed order of float32 additions and one power-of-two (exact)
scale at the end. Because every operation and its order is fixed, any implementation that follows
this recipe reproduces the reference bit for bit (the regular stage and the stage order live in
`pallas_kernels.rounding`, which the kernels import too); a dense matmul would leave the
summation order to the hardware. The dense matrices are kept for tests, for tensor-core kernels
that trade bit-exactness for speed, and for `rotate(..., method="matmul")`, which the W4A16
layer takes for its few rows.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rounding import butterfly4, regular_levels, regular_rotate

HadamardKind = Literal["regular", "sylvester", "none"]
# "none" is the naive baseline (round-to-nearest without rotation), kept for comparisons.
HADAMARD_KINDS: tuple[str, ...] = ("regular", "sylvester", "none")

# The 4x4 regular Hadamard: symmetric, every row and column sums to 2 = sqrt(4).
H4_REGULAR = np.array([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], np.int8)
H2_SYLVESTER = np.array([[1, 1], [1, -1]], np.int8)


def _log(n: int, base: int) -> int | None:
    """k with base**k == n (k >= 1), else None."""
    if not isinstance(n, (int, np.integer)) or n < base:
        return None
    k = round(math.log(n, base))
    return int(k) if base**k == n else None


def check_group_size(n: int, hadamard: str) -> int:
    """Validates a group size for a Hadamard kind and returns its number of butterfly levels."""
    if hadamard == "none":
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"group size must be a positive integer, got {n}")
        return 0
    if hadamard == "regular":
        return regular_levels(n)
    if hadamard == "sylvester":
        k = _log(n, 2)
        if k is None:
            raise ValueError(f"Sylvester Hadamard size must be a power of 2 (2, 4, 8, ...), got {n}")
        return k
    raise ValueError(f"hadamard must be one of {HADAMARD_KINDS}, got {hadamard!r}")


@functools.cache
def _dense(n: int, hadamard: str) -> np.ndarray:
    k = check_group_size(n, hadamard)
    base = H4_REGULAR if hadamard == "regular" else H2_SYLVESTER
    h = np.ones((1, 1), np.float64)
    for _ in range(k):
        h = np.kron(h, base)
    h = h / math.sqrt(n)
    h.setflags(write=False)
    return h


def regular_hadamard(n: int, dtype=jnp.float32) -> jnp.ndarray:
    """The n x n regular Hadamard matrix H4 ⊗ ... ⊗ H4 / sqrt(n), n = 4^k.

    Orthogonal and symmetric (H @ H = I); every row and column sums to ±sqrt(n) (after the
    1/sqrt(n) scale: ±1), so no output channel collects a whole row's mass.
    """
    return jnp.asarray(_dense(n, "regular"), dtype)


def sylvester_hadamard(n: int, dtype=jnp.float32) -> jnp.ndarray:
    """The n x n Sylvester Hadamard matrix H2 ⊗ ... ⊗ H2 / sqrt(n), n = 2^k (QuaRot's; its first
    row is all ones, so a token outlier lands in one channel). Kept for comparison."""
    return jnp.asarray(_dense(n, "sylvester"), dtype)


def hadamard_matrix(n: int, hadamard: HadamardKind = "regular", dtype=jnp.float32) -> jnp.ndarray:
    """The dense n x n matrix of the given kind ("none": the identity)."""
    if hadamard == "none":
        return jnp.eye(n, dtype=dtype)
    return jnp.asarray(_dense(n, hadamard), dtype)


def _sylvester_stage(x0, x1, x2, x3):
    """Unscaled H2 ⊗ H2 along one axis of 4."""
    a, b = x0 + x1, x0 - x1
    c, d = x2 + x3, x2 - x3
    return a + c, b + d, a - c, b - d


def _butterfly(x: jnp.ndarray, n: int, hadamard: str) -> jnp.ndarray:
    """x (..., n) float32 -> x @ H_n, unscaled until the final multiply by 1/sqrt(n)."""
    k = check_group_size(n, hadamard)
    if hadamard == "regular":
        return regular_rotate(x)
    lead = x.shape[:-1]
    scale = np.float32(1 / math.sqrt(n))
    if hadamard == "sylvester" and k % 2 == 1:
        # One H2 stage on the outermost axis, then H2 ⊗ H2 stages within each half.
        y = x.reshape(*lead, 2, n // 2)
        x = jnp.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], axis=-2)
        return butterfly4(x, _log(n // 2, 4) or 0, _sylvester_stage).reshape(*lead, n) * scale
    return butterfly4(x, _log(n, 4) or 0, _sylvester_stage) * scale


def rotate(x: jnp.ndarray, *, group_size: int = 256, hadamard: HadamardKind = "regular",
           method: Literal["butterfly", "matmul"] = "butterfly") -> jnp.ndarray:
    """Grouped Hadamard rotation along the last axis: each group of `group_size` values -> x_g @ H
    (hadamard="none": no rotation, the naive baseline).

    method: "butterfly" (log-depth add/subtract stages, elementwise XLA ops) or "matmul" (one
    matmul by the dense H per group): for a few rows the matmul is a single cheap kernel where the
    butterfly's stages take several, and a butterfly fused into a consumer can be recomputed per
    output element (H200, 4 x 3072: 1.9 against 7.8 us alone; the W4A16 layer at M = 4 went from
    53.7 to 19.4 us: benchmarks/notes/w4a16_matmul.md). A bfloat16 x is multiplied by H's signs
    (+-1) in bfloat16 with float32 sums, so that every product is exact and the tensor cores run
    it at bf16 speed, then scaled by 1 / sqrt(n); any other dtype by H in float32 at full
    precision. The two methods agree to float32 summation order, not bit for bit.

    Returns float32 (the rotation is computed in float32 whatever the input dtype). Raises
    ValueError when the last axis is not a multiple of `group_size`: the caller zero-pads both x
    and W if it needs another width (ConvRot pads nothing silently).
    """
    check_group_size(group_size, hadamard)
    if method not in ("butterfly", "matmul"):
        raise ValueError(f"rotation method must be 'butterfly' or 'matmul', got {method!r}")
    if hadamard == "none":
        return x.astype(jnp.float32)
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(
            f"last axis ({k}) must be a multiple of the rotation group size ({group_size}); "
            f"zero-pad the input features of x and W alike, or choose a group size dividing {k}"
        )
    lead = x.shape[:-1]
    groups = x.reshape(*lead, k // group_size, group_size)
    if method == "matmul" and x.dtype == jnp.bfloat16:
        signs = jnp.asarray(np.sign(_dense(group_size, hadamard)), jnp.bfloat16)
        sums = jnp.matmul(groups, signs, preferred_element_type=jnp.float32)
        return (sums * np.float32(1 / math.sqrt(group_size))).reshape(*lead, k)
    groups = groups.astype(jnp.float32)
    if method == "matmul":
        h = hadamard_matrix(group_size, hadamard)
        return jnp.matmul(groups, h, precision=jax.lax.Precision.HIGHEST).reshape(*lead, k)
    return _butterfly(groups, group_size, hadamard).reshape(*lead, k)
