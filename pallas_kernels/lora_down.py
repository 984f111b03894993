"""LoRA down-projection with the producer's GELU applied where x is read, Pallas Mosaic GPU (sm_90).

    h (M, r) = ((prologue(x) A^T) * s) in bf16,   A (r, K) bf16, s (r,) float32

A W4A4 layer with a LoRA branch needs h of its input u; where u is made by a producer (FLUX's
tanh-GELU before ff.net.2 and, as [attention, GELU(MLP columns)], before the single blocks'
proj_out) XLA's down-projection first writes u to HBM and reads it back (at proj_out, M = 4608,
K = 15360: 141 MB each way in bf16). This kernel reads the producer's input once and applies the
GELU in registers, so u never exists in HBM; without a prologue it is a skinny GEMM split along K
for parallelism (r is at most 256: one wgmma N).

Why not inside the rotate-quantize kernel (which holds each rotated row in registers): that kernel
gives each CTA one or two whole rows, since a row's int4 scale needs the whole rotated row
before any code is written; a product against A then reads all of A (r x K x 2 bytes: 983 KB at
K = 15360, r = 32) once per row or two, GBs of L2 traffic per layer. Sharing A over the 64+ rows a
tensor-core tile wants means holding 64 whole rows (64 x 15360 bf16 = 1.9 MB against a CTA's
227 KB of shared memory) or reading x twice, which is what this kernel does anyway, without
touching the quantization (benchmarks/notes/lora.md).

Structure: a grid of (M / 64 row tiles) x (`splits` K ranges); each CTA runs one pipeline of
(64, 64) x tiles and (r, 64) A tiles per source array (x, then a GELU tail's columns), TMA'd
into a `max_concurrent_steps`-deep ring; per step, with a GELU, the tile is loaded to registers,
GELU'd in float32 (tanh.approx.f32 by default, `LoRADownConfig.fast_tanh`) and rounded to bf16
(as XLA's producer rounds u), and is wgmma's A operand from registers (or,
`gelu_operand="smem"`, from a shared-memory copy); then one bf16 wgmma (64 x r) accumulating in
float32. Each CTA writes its float32 partial sum; one small XLA pass adds the `splits` partials,
scales by s and rounds once to bf16.

M not a multiple of 64 is padded (a copy of x; FLUX's token counts are multiples of 64); r not a
multiple of 8 gets zero rows of A (wgmma's N). `interpret=True` runs the kernel on the CPU, where
the GELU'd tile goes through shared memory (interpret mode's wgmma takes no register operand), so
the GPU tests are the ones that check the register operand.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels.rotate_quantize import SMEM_BYTES, approx_tanh, gelu_tanh
from pallas_kernels.smem import swizzle_transforms
from pallas_kernels.tile_schedule import add_pieces, sm_count

TILE_M = 64  # one warpgroup's wgmma M
MAX_RANK = 256  # one wgmma N


@dataclasses.dataclass(frozen=True)
class LoRADownConfig:
    """tile_k: K columns a step (64: one 128-byte swizzled bf16 row); max_concurrent_steps: the
    TMA ring's depth; ctas_per_sm: how many CTAs per SM the K split aims for (None: no split);
    gelu_operand: where the GELU'd tile is wgmma's A operand, "registers" or "smem" (stored to a
    shared-memory tile first; interpret mode always does); fast_tanh: the GELU's tanh as
    `tanh.approx.f32` (`rotate_quantize.approx_tanh`, as the rotate-quantize kernel's default
    GELU: its error, ~2^-11, is below the bf16 rounding of u) instead of libdevice's tanhf, which
    makes a GELU call arithmetic-bound."""

    tile_k: int = 64
    max_concurrent_steps: int = 4
    ctas_per_sm: int | None = 2
    gelu_operand: str = "registers"
    fast_tanh: bool = True

    def __post_init__(self):
        if self.gelu_operand not in ("registers", "smem"):
            raise ValueError(f"gelu_operand must be 'registers' or 'smem', got {self.gelu_operand!r}")


def supports(rank: int, *columns: int, config: LoRADownConfig | None = None) -> bool:
    """Whether the kernel takes rank `rank` and a row whose column counts `columns` (its width,
    x's width, where a GELU starts, the tail's first column) are all multiples of tile_k (the
    op's callers fall back to XLA otherwise)."""
    tk = (config or LoRADownConfig()).tile_k
    return 0 < rank <= MAX_RANK and all(c % tk == 0 for c in columns)


def _splits(m_tiles: int, steps: list[int], config: LoRADownConfig, interpret: bool) -> int:
    """The fewest K ranges (a divisor of every source's step count) that give `ctas_per_sm` CTAs
    per SM, or the most there are."""
    if config.ctas_per_sm is None:
        return 1
    common = functools.reduce(math.gcd, steps)
    divisors = [d for d in range(1, common + 1) if common % d == 0]
    want = config.ctas_per_sm * sm_count(interpret)
    return next((d for d in divisors if m_tiles * d >= want), divisors[-1])


def _kernel(*refs, sources, splits, gelu_from, tk, max_concurrent_steps, tanh):
    """CTA (row tile i, K range j): the float32 sum over its K range of bf16(prologue(x)) A^T."""
    *gmems, a_gmem, out_gmem, out_smem, stage = refs
    i, j = lax.axis_index("m"), lax.axis_index("split")

    def run(acc_ref):
        for src, (offset, width, start) in zip(gmems, sources):  # offset: its first column in the row
            steps = width // tk // splits
            first = j * steps
            if gelu_from is None or offset + width <= gelu_from:
                gelu = None
            else:
                gelu = "all" if offset >= gelu_from else "some"

            def body(idxs, x_smem, a_smem, gelu=gelu, first=first, offset=offset):
                (t,) = idxs
                operand = x_smem
                if gelu is not None:
                    v = x_smem[...].astype(jnp.float32)
                    g = gelu_tanh(v, tanh)
                    if gelu == "some":
                        g = jnp.where(offset + (first + t) * tk >= gelu_from, g, v)
                    operand = g.astype(jnp.bfloat16)  # wgmma's A from registers (WGMMA layout)
                    if stage is not None:  # through shared memory (interpret mode's wgmma takes no register A)
                        stage[...] = operand
                        plgpu.commit_smem()
                        operand = stage
                plgpu.wgmma(acc_ref, operand, a_smem.T)
                plgpu.wgmma_wait(0)  # the stage and this step's slots are free again

            plgpu.emit_pipeline(
                body,
                grid=(steps,),
                in_specs=[
                    plgpu.BlockSpec((TILE_M, tk), lambda t, first=first, start=start: (i, start // tk + first + t),
                                    transforms=swizzle_transforms(tk, 2)),
                    plgpu.BlockSpec((a_gmem.shape[0], tk), lambda t, first=first, offset=offset:
                                    (0, offset // tk + first + t), transforms=swizzle_transforms(tk, 2)),
                ],
                max_concurrent_steps=min(max_concurrent_steps, steps),
            )(src, a_gmem)
        return acc_ref[...]

    acc = pl.run_scoped(run, plgpu.ACC((TILE_M, a_gmem.shape[0]), jnp.float32))
    out_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[j, pl.ds(i * TILE_M, TILE_M)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("gelu_from", "tail_from", "config", "interpret"))
def lora_down(
    x: jax.Array,
    down: jax.Array,
    scale: jax.Array,
    *,
    gelu_from: int | None = None,
    tail: jax.Array | None = None,
    tail_from: int = 0,
    config: LoRADownConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """h (M, r) bf16 = (u A^T) * scale, float32 accumulation, one rounding; u = x, or with
    `gelu_from` (a multiple of tile_k) x's columns before it as they are and tanh-GELU of the rest
    (each rounded to bf16 first, as XLA's producer writes u); with `tail` (M, K2) the row is x's
    columns then tail's from `tail_from` on (`pallas_kernels.rotate_quantize`'s tail form, never
    concatenated). x, tail, down: bf16; down (r, K) with K the row's width; scale (r,)."""
    config = config or LoRADownConfig()
    tk = config.tile_k
    m, own = x.shape
    width = own + (0 if tail is None else tail.shape[1] - tail_from)
    r = down.shape[0]
    if x.dtype != jnp.bfloat16 or down.dtype != jnp.bfloat16 or (tail is not None and tail.dtype != jnp.bfloat16):
        raise ValueError(f"x {x.dtype}, down {down.dtype}{'' if tail is None else f', tail {tail.dtype}'} must be "
                         f"bfloat16")
    if down.ndim != 2 or down.shape[1] != width or scale.shape != (r,):
        tail_text = "" if tail is None else f", tail {tail.shape} from {tail_from}"
        raise ValueError(f"down {down.shape} and scale {scale.shape} must be (r, {width}) and (r,) for a row of "
                         f"{width} columns (x {x.shape}{tail_text})")
    if tail is not None and (tail.ndim != 2 or tail.shape[0] != m or tail_from % tk):
        raise ValueError(f"tail {tail.shape} must have x's {m} rows and tail_from={tail_from} a multiple of {tk}")
    if not supports(r, width, own, gelu_from or 0, tail_from, config=config):
        raise ValueError(f"the kernel needs rank 1..{MAX_RANK} (got {r}) and x's columns ({own}), the tail's "
                         f"({width - own}) and gelu_from ({gelu_from}) multiples of tile_k={tk}")
    if m == 0:
        return jnp.zeros((0, r), jnp.bfloat16)
    r_pad = -(-r // 8) * 8
    a = jnp.pad(down, ((0, r_pad - r), (0, 0))) if r_pad != r else down
    m_pad = -(-m // TILE_M) * TILE_M
    # (first column in the row, width, first column in the array) of x and the tail
    arrays, sources = [x], [(0, own, 0)]
    if tail is not None:
        arrays.append(tail)
        sources.append((own, width - own, tail_from))
    if m_pad != m:
        arrays = [jnp.pad(v, ((0, m_pad - m), (0, 0))) for v in arrays]
    m_tiles = m_pad // TILE_M
    splits = _splits(m_tiles, [w // tk for _, w, _ in sources], config, interpret)
    staged = interpret or config.gelu_operand == "smem"
    # The ring's stages that fit beside the output tile (and the GELU's stage).
    fixed, per_stage = TILE_M * r_pad * 4 + (TILE_M * tk * 2 if staged else 0), (TILE_M + r_pad) * tk * 2
    stages = min(config.max_concurrent_steps, (SMEM_BYTES - fixed) // per_stage)
    # The tile is loaded to registers in the WGMMA layout (a swizzled tile's default), the GELU's.
    tanh = approx_tanh(plgpu.Layout.WGMMA, interpret=interpret) if config.fast_tanh else jnp.tanh
    kernel = functools.partial(_kernel, sources=tuple(sources), splits=splits, gelu_from=gelu_from, tk=tk,
                               max_concurrent_steps=stages, tanh=tanh)
    f = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((splits, m_pad, r_pad), jnp.float32),
        grid=(m_tiles, splits),
        grid_names=("m", "split"),
        kernel_name="lora_down",
        scratch_types=[
            plgpu.SMEM((TILE_M, r_pad), jnp.float32, transforms=swizzle_transforms(r_pad, 4)),
            plgpu.SMEM((TILE_M, tk), jnp.bfloat16, transforms=swizzle_transforms(tk, 2)) if staged else None,
        ],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    partials = f(*arrays, a)
    return (add_pieces(partials)[:m, :r] * scale.astype(jnp.float32)).astype(jnp.bfloat16)  # one XLA fusion
