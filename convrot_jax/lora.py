"""Low-rank (LoRA) branches beside a linear layer: `y = layer(x) + ((x A^T) * s) B^T`, with the
factors in 16-bit and the layer's own weights untouched (a 4-bit layer is never requantized).

One branch per layer: several LoRAs on one layer are one `LowRank` whose ranks are
concatenated (A stacked, B side by side, each rank's scale in `s`), since
`sum_i s_i (x A_i^T) B_i^T = ((x [A_1; A_2]^T) * [s_1, s_2]) [B_1, B_2]^T`. The factors are
`LoRAParam` variables: inputs of a jitted step, not constants, so LoRAs of the same ranks (and
any scales) swap without recompiling.

The branch is added where a layer's output is made: `ConvDense4bit` passes its factors to
`convrot_jax.ops.w4a4_linear`, whose Pallas path fuses it (the down-projection h = (x A^T) * s in
the `pallas_kernels.lora_down` kernel, which applies a producer's GELU where it reads x, or in one
XLA GEMM on the produced input, `LowRank.down_kernel = False`; the up-projection h B^T in the W4A4
GEMM's epilogue) and whose XLA path adds the term after the W4A4 product (unfused: two XLA GEMMs,
the reference; `LowRank.fused = False` keeps a branch unfused on the Pallas path too, to measure it);
`Dense4bitWeightOnly` adds it after its product; a float `nnx.Linear` becomes a `LoRALinear`
while it carries a branch (`attach_lora` / `detach_lora`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from pallas_kernels.w4a4_matmul import LoRABlocks, check_lora_blocks


class LoRAParam(nnx.Variable):
    """A LoRA factor or its per-rank scales: frozen (not a trainable Param), an input of the step."""


@struct.dataclass
class LowRankFactors:
    """The arrays of one layer's low-rank branch: `down` A (r, K), `up` B (N, r), both in the
    activation dtype (bf16 in inference), and `scale` (r,) float32 (user scale x alpha / rank of
    the LoRA each rank comes from). `fused` (static): whether a fusing op (the Pallas W4A4 path)
    may fuse the branch into its kernels; False keeps it unfused there as well. `down_kernel`
    (static): whether a fusing op may compute h in its down-projection kernel; False: XLA's GEMM
    (`down_projection`) on the produced input. `blocks` (static): B's nonzero rectangles (row
    start, row end, rank start, rank end), B zero outside them (`LowRank` checks it), None: dense;
    the W4A4 GEMM's epilogue multiplies each output tile by the rank chunks its rows' blocks reach."""

    down: jax.Array
    up: jax.Array
    scale: jax.Array
    fused: bool = struct.field(pytree_node=False, default=True)
    down_kernel: bool = struct.field(pytree_node=False, default=True)
    blocks: LoRABlocks | None = struct.field(pytree_node=False, default=None)

    def down_projection(self, x: jax.Array) -> jax.Array:
        """h (..., r) = (x A^T) * scale, accumulated in float32 and rounded once to the factors'
        dtype, as a 16-bit tensor-core product takes it."""
        h = jax.lax.dot_general(x.astype(self.down.dtype), self.down, (((x.ndim - 1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)
        return (h * self.scale).astype(self.up.dtype)

    def term(self, x: jax.Array) -> jax.Array:
        """float32 (..., N) = ((x A^T) * scale) B^T: `down_projection`, then h B^T accumulated in
        float32."""
        h = self.down_projection(x)
        return jax.lax.dot_general(h, self.up, (((h.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    def add_to(self, y: jax.Array, x: jax.Array) -> jax.Array:
        """y + term(x), summed in float32, in y's dtype. A zero scale gives y's values exactly."""
        return (y.astype(jnp.float32) + self.term(x)).astype(y.dtype)


def add_lora(y: jax.Array, x: jax.Array, lora: LowRankFactors | None) -> jax.Array:
    """`lora.add_to(y, x)`, or y itself when there is no branch."""
    return y if lora is None else lora.add_to(y, x)


def check_factors(down: jax.Array, up: jax.Array, scale: jax.Array, in_features: int, out_features: int) -> None:
    """Raises ValueError naming the shapes when the factors do not fit a (K=in, N=out) layer."""
    rank = down.shape[0] if down.ndim == 2 else None
    if (down.ndim != 2 or up.ndim != 2 or scale.shape != (rank,) or up.shape[1] != rank
            or down.shape[1] != in_features or up.shape[0] != out_features):
        raise ValueError(
            f"LoRA factors A {tuple(down.shape)}, B {tuple(up.shape)}, scale {tuple(scale.shape)} do not fit a layer "
            f"with in_features {in_features} and out_features {out_features}: expected A (r, {in_features}), "
            f"B ({out_features}, r), scale (r,)"
        )


class LowRank(nnx.Module):
    """One layer's low-rank branch, its factors held as `LoRAParam`s (see `LowRankFactors`).
    `fused`, `down_kernel` (static, True by default): whether the layer's op may fuse it, and
    compute its down-projection in a kernel (`set_lora_fusion`). `blocks` (static): B's nonzero
    rectangles (a fused layer whose members carry their own LoRAs, `flux_flax.lora`), checked
    against B here; a layout, not values, so LoRAs of the same layout swap without recompiling."""

    def __init__(self, down: jax.Array, up: jax.Array, scale: jax.Array, *, fused: bool = True,
                 down_kernel: bool = True, blocks: LoRABlocks | None = None):
        self.blocks = None if blocks is None else tuple(tuple(int(v) for v in b) for b in blocks)
        if self.blocks is not None:
            check_blocks(np.asarray(up), self.blocks)  # on the host array, where B is given as one
        self.down = LoRAParam(jnp.asarray(down))
        self.up = LoRAParam(jnp.asarray(up))
        self.scale = LoRAParam(jnp.asarray(scale, jnp.float32))
        self.fused = fused
        self.down_kernel = down_kernel

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def factors(self) -> LowRankFactors:
        return LowRankFactors(self.down[...], self.up[...], self.scale[...], self.fused, self.down_kernel, self.blocks)


def check_blocks(up: np.ndarray, blocks: LoRABlocks) -> None:
    """Raises ValueError unless `blocks` are rectangles inside B (N, r) outside which B is zero."""
    check_lora_blocks(blocks, up.shape)
    inside = np.zeros(up.shape, bool)
    for a, b, c, d in blocks:
        inside[a:b, c:d] = True
    outside = np.argwhere((up != 0) & ~inside)
    if outside.size:
        raise ValueError(f"LoRA B {up.shape} has {len(outside)} nonzeros outside its blocks {blocks}, first at (row, "
                         f"rank) {tuple(int(v) for v in outside[0])}")


def set_lora_fusion(model: nnx.Module, fused: bool, *, down_kernel: bool = True) -> nnx.Module:
    """Sets, IN PLACE, whether every LoRA branch of `model` may be fused into its layer's kernels
    (True, the default of a new branch) or runs unfused (two XLA GEMMs after the layer), and
    whether a fused branch's down-projection runs in its kernel (True, the default) or as XLA's
    GEMM on the produced input: the comparisons the benchmark measures; returns `model`. Static
    settings: a jitted step compiles again after a change."""
    for _, branch in nnx.iter_graph(model):
        if isinstance(branch, LowRank):
            branch.fused = fused
            branch.down_kernel = down_kernel
    return model


class LoRALinear(nnx.Linear):
    """An `nnx.Linear` with a low-rank branch: the same variables at the same paths, plus `lora`.
    `attach_lora` turns a plain `nnx.Linear` into one (a class change, no copy) and `detach_lora`
    back, so that a model without LoRAs has exactly its original graph (and compiled programs)."""

    lora: LowRank | None = None

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        y = super().__call__(inputs, out_sharding=out_sharding)
        return add_lora(y, inputs, None if self.lora is None else self.lora.factors())


def layer_features(layer: nnx.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer that can carry a branch."""
    return int(layer.in_features), int(layer.out_features)


def attach_lora(layer: nnx.Module, lora: LowRank) -> None:
    """Gives `layer` (an `nnx.Linear` or a layer class declaring `lora`, e.g. the int4 layers)
    the branch `lora`, replacing any it had. Raises ValueError naming the shapes when the factors
    do not fit, TypeError for a layer that cannot carry one."""
    if type(layer) is nnx.Linear:
        layer.__class__ = LoRALinear
    elif "lora" not in dir(type(layer)):
        raise TypeError(f"a {type(layer).__name__} cannot carry a LoRA branch")
    check_factors(lora.down, lora.up, lora.scale, *layer_features(layer))
    layer.lora = lora


def detach_lora(layer: nnx.Module) -> None:
    """Removes `layer`'s branch, restoring its graph as it was before `attach_lora`."""
    if "lora" in vars(layer):
        del layer.lora
    if type(layer) is LoRALinear:
        layer.__class__ = nnx.Linear


def carries_loras(model: nnx.Module) -> bool:
    """Whether any layer of `model` carries a branch (checked by what would drop one: fusing,
    quantizing or saving the model)."""
    return bool(jax.tree.leaves(nnx.state(model, LoRAParam)))


def refuse_loras(model: nnx.Module, action: str) -> None:
    """Raises ValueError when `model` carries LoRA branches, which `action` would lose."""
    if carries_loras(model):
        raise ValueError(f"cannot {action} a model carrying LoRA branches: unload them first, then load them again")
