"""Fused grouped regular-Hadamard rotation + per-token int4 quantization, Pallas Mosaic GPU (sm_90).

x (M, K) -> int4 codes (int8, or packed two a byte) and float32 per-row scales, bit-identical to
`rotate_quantize_reference` (the recipe of `pallas_kernels.rounding`). Data placement is
explicit: each thread holds, at every moment, exactly the values one butterfly level needs, so no
level moves data between threads except one shared-memory transpose per group. (A Pallas Triton
version left the placement to Triton, which moved every level's values between threads through
shared memory; it was removed, its figures stay in benchmarks/notes/rotate_quantize.md.)

A group of n = 4^L values is viewed as a (hi, lo) matrix, hi = 4^(L // 2) (its leading base-4
digits), lo = n / hi. The reference butterfly runs the levels over hi's digits first, then over
lo's. So, per chunk of `chunk_groups` groups of `rows` rows:
- phase 1: `hi` loads from shared memory, load h = column block h of every group (shape
  (rows, chunk_groups, lo), one element per thread and position, `plgpu.Layout.WG_STRIDED`); the
  levels over hi's digits are then elementwise between the `hi` arrays (`outer_stages`);
- transpose: the `hi` results go to a padded float32 scratch (rows, chunk_groups, hi, lo + 1) and
  come back as `lo` arrays, array l = column l of every (group, h) row: the padding makes both the
  stores and the transposed loads free of bank conflicts;
- phase 2: the levels over lo's digits, elementwise between the `lo` arrays; times 1/sqrt(n).
The per-row absmax needs the whole rotated row before any code is written. Where the rotated rows
fit in registers (rows * K / 128 <= KEEP_LIMIT values a thread: every FLUX width, K = 15360 after
padding to one-row blocks) the kernel rotates once and keeps them; otherwise it rotates twice, once
for a running elementwise max and once for the codes. Codes go to shared memory four (int8) or
eight (packed) to a 32-bit store, then out in one bulk copy per block.

Bit-identity: float32 adds in the reference's order, one power-of-two multiply, the reference's
scale formula, an IEEE division 1 / scale (inline `div.rn.f32`: with LLVM's divf, 1-3 codes in 57M
differed on the H100), one rounded multiply (`mul.rn.f32`), round half to even, clip to [-7, 7];
a row holding NaN/Inf gets a NaN scale and zero codes.

Prologues (the producer of the layer's input, computed here from the producer's own input, so
its output never goes through HBM; within one code step of the reference on <= 0.1% of codes):
"gelu_tanh" applies tanh-GELU to the loaded values (from column `gelu_from` on); "layernorm" first
makes two more passes over the rows in shared memory (mean, then variance, each a per-row
warpgroup reduction), and with `shift`/`scale` (per image) row slot r of a modulation buffer holds
the (shift, scale) rows of row r's image. A modulated call runs a persistent grid: each program
takes a contiguous run of blocks and copies modulation rows only when its block's images change
(for one image: once per program; one copy per block lost to XLA's producer + the plain kernel).

A `tail` makes the row two arrays' columns: x's, then tail's from `tail_from` on, each copied
straight to its place in the block's shared memory, so their concatenation (FLUX's single blocks:
[attention output, MLP half of the fused projection]) is never written to HBM.

Measurements: benchmarks/results/rotate_quantize.md; notes: benchmarks/notes/rotate_quantize.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.rotate_quantize_reference import LAYERNORM_EPS, Prologue, check_inputs
from pallas_kernels.rounding import int4_round, int4_scale, regular_levels, regular_stage
from pallas_kernels.tile_schedule import sm_count

WARPGROUP = 128


# Rotated values a thread may hold between the two halves of the one-pass form (float32
# registers; ptxas has 255): rows * padded K / 128 of them.
KEEP_LIMIT = 128
# Input values a thread may hold besides them (a LayerNorm's three sweeps from one load).
HOLD_LIMIT = 64
SMEM_BYTES = 227 * 1024  # what one CTA may use on the H100


@dataclasses.dataclass(frozen=True)
class RotateQuantizeConfig:
    """Block configuration. rows: rows per CTA (None: the fewest that tile K evenly);
    chunk_mult: groups per chunk as a multiple of the fewest (more values per thread, more
    independent adds in flight, more registers); keep: hold the rotated rows in registers and
    rotate once (True), or rotate twice, once for the absmax and once for the codes (False);
    None: keep when rows * (padded) K / 128 <= KEEP_LIMIT. persistent: `programs_per_sm`
    programs per SM, each taking a contiguous run of blocks (and loading its image's modulation
    rows once per image it meets) instead of one program per block; None: persistent when
    modulated. hold_input (LayerNorm with `keep` only): load the rows once into registers for the
    statistics and the rotation, instead of once per sweep from shared memory; None: when
    rows * (padded) K / 128 <= HOLD_LIMIT. pack_modulation (bf16 shift and scale only): one
    32-bit word per column holds both, one shared-memory load instead of two (H200, M = 4608,
    K = 3072: 46.3 -> 40.3 us, the same codes). fast_tanh: the GELU's tanh as the GPU's
    one-instruction approximation (`tanh.approx.f32`, relative error about 2^-11) instead of
    libdevice's float32 tanhf (a few ulps, ~20 instructions). The default: the GELU calls were
    arithmetic-bound (H200, M = 4608, K = 12288: 112.3 -> 76.9 us; K = 15360: 149.0 -> 110.2,
    `results/fast_tanh/`), and the error is below the bf16 rounding the unfused path applies to
    the GELU's output (2^-9); 197 of 56.6 M codes moved by one level against tanhf there."""

    rows: int | None = None
    chunk_mult: int = 1
    keep: bool | None = None
    persistent: bool | None = None
    programs_per_sm: int = 2
    hold_input: bool | None = None
    pack_modulation: bool = True
    fast_tanh: bool = True


def keep_rotated(k: int, rows: int, config: RotateQuantizeConfig) -> bool:
    """Whether the kernel rotates once and keeps the rotated rows (K = k, padded) in registers."""
    return config.keep if config.keep is not None else rows * k // WARPGROUP <= KEEP_LIMIT


def _split(n: int) -> tuple[int, int]:
    """(hi, lo) = (4^(levels // 2), n / hi): a group viewed as a matrix (module docstring)."""
    levels = regular_levels(n)
    hi = 4 ** (levels // 2)
    return hi, n // hi


def plan(k: int, n: int, config: RotateQuantizeConfig) -> tuple[int, int, int]:
    """(rows per CTA, groups per chunk, groups held per row) for K = k, group n. Every
    per-index array of a chunk, rows * chunk_groups * min(hi, lo) elements, must fill the
    warpgroup's 128 threads evenly. One-row blocks are preferred (the most CTAs, the fewest
    registers for a one-pass row); when K's groups do not fill whole chunks, the row is padded
    with zero groups (which rotate to zeros and leave the absmax alone) if that costs at most
    1/8 more work; otherwise several rows share each chunk."""
    hi, lo = _split(n)
    groups = k // n
    need = max(1, WARPGROUP // min(hi, lo))  # rows * chunk_groups must be a multiple of this
    mult = config.chunk_mult
    pad = -groups % (need * mult)
    if config.rows in (None, 1) and 8 * pad <= groups and pad * n % WARPGROUP == 0:
        return 1, need * mult, groups + pad
    chunk = math.gcd(groups, need)
    rows = config.rows or need // chunk
    if (rows * chunk) % need:
        raise ValueError(f"rows={rows} cannot tile K={k} (group {n}): rows * {chunk} must be a multiple of {need}")
    if groups % (chunk * mult):
        raise ValueError(f"chunk_mult={mult} does not divide the {groups // chunk} chunks of a K={k} row")
    return rows, chunk * mult, groups


def outer_stages(parts: list[jax.Array], levels: int) -> list[jax.Array]:
    """4^levels same-shape arrays, part p = the slice of every group at base-4 digits p (most
    significant first) -> the reference's first `levels` stages, elementwise between arrays."""
    for level in range(levels):
        stride = 4 ** (levels - 1 - level)
        out = list(parts)
        for base in range(len(parts)):
            if (base // stride) % 4 == 0:
                idx = [base + j * stride for j in range(4)]
                for i, y in zip(idx, regular_stage(*(parts[i] for i in idx))):
                    out[i] = y
        parts = out
    return parts


def _ptx(instr: str, layout, *arrays: jax.Array, interpret: bool, fallback) -> jax.Array:
    """An elementwise float32 PTX instruction (`instr d, a, b;`) on arrays of one layout: the
    exact rounding the reference's XLA ops have, which LLVM's lowering of divf (and of a multiply
    it may contract) does not promise. `fallback` (jnp) runs in interpret mode."""
    if interpret:
        return fallback(*arrays)
    shape = arrays[0].shape

    @plgpu.inline_mgpu(arg_types=(layout,) * len(arrays),
                       return_type=plgpu.ShapeDtypeStruct(shape, jnp.float32, layout=layout))
    def apply(_, first, *rest):
        return first._pointwise(mgpu.FragmentedArray._lift_fast_instr(instr), *rest)

    return apply(*arrays)


def _store_word(ref, j: int, value: jax.Array, layout, *, interpret: bool) -> None:
    """ref (rows, groups, hi * words) int32: word j of every (row, group, h) <- value (rows,
    groups, hi). A strided view with no contiguous axis: Pallas slices refs without strides only,
    and its store first loads the old value in a vectorised default layout such a view cannot
    give, so the store is written in Mosaic GPU directly."""
    rows, groups, width = ref.shape
    hi = value.shape[-1]
    if interpret:
        ref[:, :, pl.ds(j, hi, width // hi)] = value
        return

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), layout))
    def store(_, smem, v):
        words = mgpu.utils.memref_reshape(smem, (rows, groups, hi, width // hi))
        v.store_untiled(mgpu.utils.memref_slice(words, (slice(None), slice(None), slice(None), j)))

    store(ref, value)


def _store_scale(scales_gmem, row, m: int, value) -> None:
    """scales[row] = value for the rows that exist (the last block may run past M)."""

    @pl.when(row < m)
    def _():
        scales_gmem[row] = value


def _first_group(c, chunk: int):
    """First group of chunk c (a Python int when the chunk loop is unrolled)."""
    return c * chunk if isinstance(c, int) else pl.multiple_of(c * chunk, chunk)


# tanh.approx.f32's error: about 2^-11 relative by the PTX ISA (|tanh| <= 1, so also absolute); twice
# that is what the bounds charge for it.
FAST_TANH_ERROR = 2.0**-10


def approx_tanh(layout, *, interpret: bool) -> Callable[[jax.Array], jax.Array]:
    """tanh of float32 arrays of `layout` as the GPU's one-instruction `tanh.approx.f32`
    (FAST_TANH_ERROR; libdevice's tanhf takes ~20 instructions); jnp.tanh in interpret mode."""
    return functools.partial(_ptx, "tanh.approx.f32", layout, interpret=interpret, fallback=jnp.tanh)


def gelu_tanh(x: jax.Array, tanh=jnp.tanh) -> jax.Array:
    """jax.nn.gelu(x, approximate=True), in ops Mosaic GPU lowers (also `lora_down`'s prologue);
    `tanh`: the tanh it uses."""
    return x * (0.5 * (1.0 + tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * (x * x * x)))))


class _Block(NamedTuple):
    """One CTA's shared-memory refs and the static shape of its chunks (module docstring)."""

    x: object  # (rows, held groups, hi, lo) input rows, smem
    mod: object | None  # (rows, held groups, 2, hi, lo) the image's shift and scale rows, smem
    y: object  # (2, rows, chunk, hi, lo + 1) float32 transpose scratch, smem
    out: object  # (rows, held groups, hi * words) int32 code words, smem
    chunk: int  # groups per chunk
    real: int  # groups of a row before padding
    interpret: bool
    fast_tanh: bool  # the GELU's tanh: tanh.approx.f32 instead of tanhf (RotateQuantizeConfig)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    @property
    def groups(self) -> int:
        """Groups a row holds, zero groups included."""
        return self.x.shape[1]

    @property
    def hi(self) -> int:
        return self.x.shape[2]

    @property
    def lo(self) -> int:
        return self.x.shape[3]

    @property
    def shape1(self) -> tuple[int, int, int]:
        """Phase 1 arrays: one column block of every group of a chunk."""
        return (self.rows, self.chunk, self.lo)

    @property
    def shape2(self) -> tuple[int, int, int]:
        """Phase 2 arrays: one column of every (group, h) row of a chunk."""
        return (self.rows, self.chunk, self.hi)

    @property
    def layout1(self):
        return plgpu.Layout.WG_STRIDED(self.shape1, vec_size=1)

    @property
    def layout2(self):
        return plgpu.Layout.WG_STRIDED(self.shape2, vec_size=1)


def _load_parts(b: _Block, c) -> list[jax.Array]:
    """Chunk c as `hi` float32 arrays of `shape1`: array h = column block h of every group."""
    g0 = _first_group(c, b.chunk)
    return [plgpu.load(b.x.at[:, pl.ds(g0, b.chunk), h, :], layout=b.layout1).astype(jnp.float32)
            for h in range(b.hi)]


def _valid(b: _Block, c) -> jax.Array | None:
    """Which elements of chunk c's phase 1 arrays belong to real (unpadded) groups; None when
    nothing is padded."""
    if b.real == b.groups:
        return None
    g = plgpu.layout_cast(jax.lax.broadcasted_iota(jnp.int32, b.shape1, 1), b.layout1)
    return g + _first_group(c, b.chunk) < b.real


def _per_row(total: jax.Array, layout, rows: int, op) -> tuple[jax.Array, list[jax.Array]]:
    """(the row index of every element, the reduction `op` of each row of `total` as a scalar)."""
    row_of = plgpu.layout_cast(jax.lax.broadcasted_iota(jnp.int32, total.shape, 0), layout)
    return row_of, [op(jnp.where(row_of == r, total, 0.0)) for r in range(rows)]


def _by_row(row_of: jax.Array, values: list[jax.Array], like: jax.Array) -> jax.Array:
    """An array shaped like `like` holding values[r] at row r."""
    out = like
    for r, v in enumerate(values):
        out = jnp.where(row_of == r, v, out)
    return out


def _layernorm_stats(b: _Block, n: int, held: list | None) -> tuple[jax.Array, jax.Array]:
    """(mean, 1 / std) of each row, broadcast to `shape1`: two sweeps over the rows, the second
    over squared deviations from the mean (the zero groups left out). `held`: every chunk's
    loaded arrays, kept in registers (the sweeps then read no shared memory); None: each sweep
    loads them again. Same float32 operations in the same order either way."""
    chunks, count = b.groups // b.chunk, np.float32(b.real * n)
    zero1 = plgpu.layout_cast(jnp.zeros(b.shape1, jnp.float32), b.layout1)

    def sweep(add, acc):
        if held is None:
            return jax.lax.fori_loop(0, chunks, lambda c, acc: add(c, _load_parts(b, c), acc), acc)
        return functools.reduce(lambda acc, c: add(c, held[c], acc), range(chunks), acc)

    def add_sum(c, parts, acc):
        return functools.reduce(jnp.add, parts, acc)

    row_of1, sums = _per_row(sweep(add_sum, zero1), b.layout1, b.rows, jnp.sum)
    mean = _by_row(row_of1, [s_ / count for s_ in sums], zero1)

    def add_square(c, parts, acc):
        d = [jnp.square(v - mean) for v in parts]
        ok = _valid(b, c)
        if ok is not None:
            d = [jnp.where(ok, v, 0.0) for v in d]
        return functools.reduce(jnp.add, d, acc)

    _, squares = _per_row(sweep(add_square, zero1), b.layout1, b.rows, jnp.sum)
    rstd = _by_row(row_of1, [jax.lax.rsqrt(q / count + np.float32(LAYERNORM_EPS)) for q in squares], zero1)
    return mean, rstd


def _gelu_parts(b: _Block, c, parts: list[jax.Array], gelu_from: int) -> list[jax.Array]:
    """tanh-GELU on the groups of chunk c from group `gelu_from` on (static where the chunk loop
    is unrolled, a per-element select where it is not)."""
    g0 = _first_group(c, b.chunk)
    tanh = approx_tanh(b.layout1, interpret=b.interpret) if b.fast_tanh else jnp.tanh
    if isinstance(g0, int) and g0 >= gelu_from:
        return [gelu_tanh(v, tanh) for v in parts]
    if isinstance(g0, int) and g0 + b.chunk <= gelu_from:
        return parts
    g = plgpu.layout_cast(jax.lax.broadcasted_iota(jnp.int32, b.shape1, 1), b.layout1)
    on = g + g0 >= gelu_from
    return [jnp.where(on, gelu_tanh(v, tanh), v) for v in parts]


def _prologue_parts(b: _Block, c, prologue: Prologue, stats, gelu_from: int, held: list | None) -> list[jax.Array]:
    """Chunk c's phase 1 arrays after the prologue (`stats`: the LayerNorm's (mean, rstd);
    `gelu_from`: the first group the GELU applies to; `held`: the chunks already loaded, or None)."""
    parts = _load_parts(b, c) if held is None else held[c]
    if prologue == "gelu_tanh":
        return _gelu_parts(b, c, parts, gelu_from)
    if prologue == "none":
        return parts
    mean, rstd = stats
    parts = [(v - mean) * rstd for v in parts]
    if b.mod is not None:
        g0 = _first_group(c, b.chunk)
        if b.mod.dtype == jnp.int32:  # bf16 shift (low half) and scale (high half): a bf16 is a float32's high half
            words = [plgpu.load(b.mod.at[:, pl.ds(g0, b.chunk), h, :], layout=b.layout1) for h in range(b.hi)]
            mod = [[jax.lax.bitcast_convert_type(w << 16, jnp.float32) for w in words],
                   [jax.lax.bitcast_convert_type(w & np.int32(-65536), jnp.float32) for w in words]]
        else:
            mod = [[plgpu.load(b.mod.at[:, pl.ds(g0, b.chunk), i, h, :], layout=b.layout1).astype(jnp.float32)
                    for h in range(b.hi)] for i in range(2)]
        parts = [v * (1 + sc) + sh for v, sh, sc in zip(parts, *mod)]
    ok = _valid(b, c)
    return parts if ok is None else [jnp.where(ok, v, 0.0) for v in parts]


def _rotated(b: _Block, c, n: int, prologue: Prologue, stats, gelu_from: int, held: list | None) -> list[jax.Array]:
    """The rotated chunk c as `lo` arrays of `shape2`: array l, element (r, g, h) is rotated
    column h * lo + l of group c * chunk + g. Phase 1, the transpose, phase 2, times 1/sqrt(n)."""
    levels = regular_levels(n)
    parts = outer_stages(_prologue_parts(b, c, prologue, stats, gelu_from, held), levels // 2)
    y = b.y.at[c % 2]
    for h in range(b.hi):
        y[:, :, h, pl.ds(0, b.lo)] = parts[h]
    plgpu.commit_smem()  # the transpose: every thread's stores before anyone's loads
    cols = [plgpu.load(y.at[:, :, :, l], layout=b.layout2) for l in range(b.lo)]
    return [v * np.float32(1 / math.sqrt(n)) for v in outer_stages(cols, levels - levels // 2)]


def _running_max(vals: list[jax.Array], running: jax.Array) -> jax.Array:
    """running, updated with the magnitudes of one rotated chunk."""
    return functools.reduce(jnp.maximum, [jnp.abs(v) for v in vals], running)


def _scale_rows(b: _Block, running: jax.Array, scales_gmem, block, m: int) -> tuple[jax.Array, jax.Array]:
    """From the running elementwise max of block `block`'s rows: each row's scale goes to
    scales_gmem (NaN for a non-finite row); returns (finite row, 1 / scale) broadcast to `shape2`."""
    row_of, absmaxes = _per_row(running, b.layout2, b.rows, jnp.max)
    oks = [absmax < np.float32(np.inf) for absmax in absmaxes]  # False for NaN too
    scales = [int4_scale(absmax) for absmax in absmaxes]
    for r, (ok, scale) in enumerate(zip(oks, scales)):
        _store_scale(scales_gmem, block * b.rows + r, m, jnp.where(ok, scale, np.float32(np.nan)))
    ones = plgpu.layout_cast(jnp.ones(b.shape2, jnp.float32), b.layout2)
    finite = _by_row(row_of, oks, row_of < 0)
    inv = _ptx("div.rn.f32", b.layout2, ones, _by_row(row_of, scales, ones), interpret=b.interpret,
               fallback=jnp.divide)
    return finite, inv


def _write_codes(b: _Block, c, vals: list[jax.Array], finite: jax.Array, inv: jax.Array, bits: int) -> None:
    """Chunk c's codes to shared memory, 32 // bits of them to a word (zero for non-finite rows)."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    dst = b.out.at[:, pl.ds(_first_group(c, b.chunk), b.chunk)]
    for j in range(b.lo // per_word):
        word = jnp.zeros(b.shape2, jnp.int32)
        for k in range(per_word):
            v = _ptx("mul.rn.f32", b.layout2, vals[per_word * j + k], inv, interpret=b.interpret,
                     fallback=jnp.multiply)
            q = int4_round(v).astype(jnp.int32)
            word = word | ((q & mask) << (bits * k))
        _store_word(dst, j, jnp.where(finite, word, 0), b.layout2, interpret=b.interpret)


class _Grid(NamedTuple):
    """Which blocks of `rows` rows each program runs: a contiguous run of `per` or `per + 1`
    blocks (the first `extra` programs take one more); per == 1, extra == 0: one block each."""

    programs: int
    per: int
    extra: int

    @staticmethod
    def of(blocks: int, programs: int) -> "_Grid":
        programs = min(programs, blocks)
        return _Grid(programs, blocks // programs, blocks % programs)

    def run(self, program):
        """(first block, number of blocks) of `program`."""
        if self.per == 1 and not self.extra:
            return program, 1
        first = program * self.per + jnp.minimum(program, self.extra)
        return first, self.per + (program < self.extra).astype(jnp.int32)


def _images(block, rows: int, tokens_per_image: int, images: int) -> list:
    """The image of each row of block `block` (the rows past M: the last image)."""
    return [jnp.minimum((block * rows + r) // tokens_per_image, images - 1) for r in range(rows)]


def _load_modulation(mod_gmem, mod_smem, barriers, images: list, real: int) -> None:
    """Row slot r of the block's modulation buffer <- image images[r]'s (shift, scale) rows."""
    for r, image in enumerate(images):
        plgpu.copy_gmem_to_smem(mod_gmem.at[pl.ds(image, 1)], mod_smem.at[pl.ds(r, 1), pl.ds(0, real)],
                                barriers.at[1 + r])
    for r in range(len(images)):
        plgpu.barrier_wait(barriers.at[1 + r])


def _kernel(*refs, m, n, rows, chunk, bits, keep, hold, prologue, modulated, tailed, tail_from, tokens_per_image,
            gelu_from, grid, interpret, fast_tanh):
    """A program's blocks of `rows` rows, one after another: load a block (and, when its image
    changes, that image's modulation rows) to shared memory, apply the prologue, rotate chunk by
    chunk, reduce each row's absmax, write scales and codes."""
    refs = list(refs)
    x_gmem = refs.pop(0)
    tail_gmem = refs.pop(0) if tailed else None
    mod_gmem = refs.pop(0) if modulated else None
    codes_gmem, scales_gmem, x_smem = refs[:3]
    mod_smem = refs[3] if modulated else None
    out_smem, y_smem, barriers = refs[-3:]
    own = x_gmem.shape[1]  # groups from x; the tail's follow
    tail_groups = tail_gmem.shape[1] - tail_from if tailed else 0
    b = _Block(x_smem, mod_smem, y_smem, out_smem, chunk, real=own + tail_groups, interpret=interpret,
               fast_tanh=fast_tanh)
    tail_barrier = barriers.at[1 + (rows if modulated else 0)]
    chunks = b.groups // chunk
    if b.real < b.groups:  # one-row blocks only (plan): the zero groups that round the row up to whole chunks
        x_smem[:, pl.ds(b.real, b.groups - b.real)] = jnp.zeros((rows, b.groups - b.real, b.hi, b.lo), x_smem.dtype)
        plgpu.commit_smem()
    rotated = functools.partial(_rotated, b, n=n, prologue=prologue, gelu_from=gelu_from // n)
    zero = plgpu.layout_cast(jnp.zeros(b.shape2, jnp.float32), b.layout2)

    def one_block(block, mod_key):
        """Block `block`; `mod_key`: which images' modulation rows the buffer holds, as (image of
        the first row) * B + (image of the last row) (-1: none). Returns what it holds after."""
        plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(block * rows, rows)], x_smem.at[:, pl.ds(0, own)], barriers.at[0])
        if tailed:
            plgpu.copy_gmem_to_smem(tail_gmem.at[pl.ds(block * rows, rows), pl.ds(tail_from, tail_groups)],
                                    x_smem.at[:, pl.ds(own, tail_groups)], tail_barrier)
        if modulated:
            images = _images(block, rows, tokens_per_image, mod_gmem.shape[0])
            new = images[0] * mod_gmem.shape[0] + images[-1]  # a block's rows span consecutive images

            @pl.when(new != mod_key)
            def _():
                _load_modulation(mod_gmem, mod_smem, barriers, images, b.real)

            mod_key = new
        plgpu.barrier_wait(barriers.at[0])
        if tailed:
            plgpu.barrier_wait(tail_barrier)

        # A LayerNorm sweeps the rows three times: with `hold`, all from one load into registers.
        held = [_load_parts(b, c) for c in range(chunks)] if hold else None
        stats = _layernorm_stats(b, n, held) if prologue == "layernorm" else None
        rot = functools.partial(rotated, stats=stats, held=held)
        if keep:  # one pass: the rotated row stays in registers until its scale is known
            saved = [rot(c) for c in range(chunks)]
            running = functools.reduce(lambda acc, vals: _running_max(vals, acc), saved, zero)
        else:  # two passes: rotate for the absmax, rotate again for the codes
            running = jax.lax.fori_loop(0, chunks, lambda c, acc: _running_max(rot(c), acc), zero)
        finite, inv = _scale_rows(b, running, scales_gmem, block, m)
        if keep:
            for c, vals in enumerate(saved):
                _write_codes(b, c, vals, finite, inv, bits)
        else:
            plgpu.commit_smem()  # pass 1's last transposed loads before pass 2's first stores
            jax.lax.fori_loop(0, chunks, lambda c, carry: (_write_codes(b, c, rot(c), finite, inv, bits), carry)[1], 0)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[:, pl.ds(0, b.real)], codes_gmem.at[pl.ds(block * rows, rows)])
        plgpu.wait_smem_to_gmem(0)  # and a warpgroup barrier: every read of this block's buffers is done
        return mod_key

    first, count = grid.run(jax.lax.axis_index("programs"))
    if isinstance(count, int):
        one_block(first, jnp.int32(-1))
    else:
        jax.lax.fori_loop(0, count, lambda i, mod_key: one_block(first + i, mod_key), jnp.int32(-1))


def _check_tail(x: jax.Array, tail: jax.Array, tail_from: int, group_size: int) -> None:
    """Raises ValueError naming the shapes when `tail` cannot follow x's columns."""
    if tail.ndim != 2 or tail.shape[0] != x.shape[0] or tail.dtype != x.dtype:
        raise ValueError(f"tail {tail.shape} {tail.dtype} must be (M, K2) with x's M = {x.shape[0]} rows and dtype "
                         f"{x.dtype}")
    if tail.shape[1] % group_size or tail_from % group_size or not 0 <= tail_from < tail.shape[1]:
        raise ValueError(f"tail's {tail.shape[1]} columns and tail_from={tail_from} must be multiples of group_size "
                         f"({group_size}), tail_from inside the tail (shape {tail.shape})")


# Jitted with the settings static: every call at the same shapes in a model shares one traced and
# lowered kernel (FLUX's W4A4 step otherwise lowers ~300 copies of each and compiles for minutes).
@functools.partial(jax.jit, static_argnames=("group_size", "packed", "prologue", "gelu_from", "tail_from", "config",
                                             "interpret"))
def rotate_quantize(
    x: jax.Array,
    *,
    group_size: int = 256,
    packed: bool = False,
    prologue: Prologue = "none",
    shift: jax.Array | None = None,
    scale: jax.Array | None = None,
    gelu_from: int = 0,
    tail: jax.Array | None = None,
    tail_from: int = 0,
    config: RotateQuantizeConfig | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """x (M, K) bf16/f32 -> (codes, float32 scales (M,)) as `rotate_quantize_reference`: codes
    int8 (M, K) in [-7, 7], or with `packed` uint8 (M, K/2), low nibble = even k; bit-identical
    without a prologue. prologue: "none"; "layernorm" (no affine, eps 1e-6), modulated as
    LN(x) * (1 + scale) + shift when shift and scale (B, K) are given, image b owning rows
    [b * M/B, (b + 1) * M/B); or "gelu_tanh" on the columns from `gelu_from` (a multiple of
    group_size) on. tail (M, K2), same dtype: the row is x's columns, then tail's from `tail_from`
    (a multiple of group_size) on, as if concatenated (K = K1 + K2 - tail_from; gelu_from and
    shift/scale refer to that row). interpret: Mosaic GPU interpret mode (CPU tests)."""
    config = config or RotateQuantizeConfig()
    own_k = x.shape[-1]
    if tail is not None:
        _check_tail(x, tail, tail_from, group_size)
    row = x if tail is None else jax.ShapeDtypeStruct((x.shape[0], own_k + tail.shape[1] - tail_from), x.dtype)
    modulated = check_inputs(row, group_size, prologue, shift, scale, gelu_from)
    m, k = row.shape
    n = group_size
    hi, lo = _split(n)
    bits = 4 if packed else 8
    words = lo * bits // 32
    if lo * bits % 32:  # codes leave in whole 32-bit words
        raise ValueError(f"group_size {n} is too small for this kernel{' with packed=True' if packed else ''}")
    rows, chunk, held = plan(k, n, config)
    groups = k // n
    tokens_per_image = m // shift.shape[0] if modulated else m
    mod_dtype = jnp.result_type(shift, scale) if modulated else x.dtype
    smem = rows * held * n * (x.dtype.itemsize + bits // 8) + 2 * rows * chunk * hi * (lo + 1) * 4
    if modulated:
        smem += rows * held * n * 2 * jnp.dtype(mod_dtype).itemsize
    if smem > SMEM_BYTES:
        raise ValueError(f"{config} needs {smem} bytes of shared memory at K={k} (rows={rows}, {chunk} groups "
                         f"per chunk), over the {SMEM_BYTES} a CTA has: lower rows or chunk_mult")
    blocks = pl.cdiv(m, rows)
    persistent = config.persistent if config.persistent is not None else modulated
    grid = _Grid.of(blocks, config.programs_per_sm * sm_count(interpret) if persistent else blocks)
    keep = keep_rotated(held * n, rows, config)
    hold = prologue == "layernorm" and keep and (config.hold_input if config.hold_input is not None else
                                                 rows * held * n // WARPGROUP <= HOLD_LIMIT)
    kernel = functools.partial(_kernel, m=m, n=n, rows=rows, chunk=chunk, bits=bits, keep=keep, hold=hold,
                               prologue=prologue, modulated=modulated, tailed=tail is not None,
                               tail_from=tail_from // n, tokens_per_image=tokens_per_image, gelu_from=gelu_from,
                               grid=grid, interpret=interpret, fast_tanh=config.fast_tanh)
    inputs = [x.reshape(m, own_k // n, hi, lo)]
    if tail is not None:
        inputs.append(tail.reshape(m, tail.shape[1] // n, hi, lo))
    mod_smem = []
    if modulated and config.pack_modulation and mod_dtype == jnp.bfloat16:  # (B, groups, hi, lo) words
        halves = [jax.lax.bitcast_convert_type(v, jnp.uint16).astype(jnp.uint32) for v in (shift, scale)]
        word = jax.lax.bitcast_convert_type(halves[0] | (halves[1] << 16), jnp.int32)
        inputs.append(word.reshape(-1, groups, hi, lo))
        mod_smem = [plgpu.SMEM((rows, held, hi, lo), jnp.int32)]
    elif modulated:  # (B, groups, 2, hi, lo): one image's shift and scale rows in one copy
        mod = jnp.stack([shift.astype(mod_dtype), scale.astype(mod_dtype)], axis=1)
        inputs.append(jnp.moveaxis(mod.reshape(-1, 2, groups, hi, lo), 1, 2))
        mod_smem = [plgpu.SMEM((rows, held, 2, hi, lo), mod_dtype)]
    f = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((m, groups, hi * words), jnp.int32),
            jax.ShapeDtypeStruct((m,), jnp.float32),
        ),
        grid=(grid.programs,),
        grid_names=("programs",),
        kernel_name="rotate_quantize",  # how profiles (bench_e2e's stages) tell it from the GEMM
        scratch_types=[
            plgpu.SMEM((rows, held, hi, lo), x.dtype),
            *mod_smem,
            plgpu.SMEM((rows, held, hi * words), jnp.int32),
            plgpu.SMEM((2, rows, chunk, hi, lo + 1), jnp.float32),
            plgpu.Barrier(num_barriers=1 + (rows if modulated else 0) + (tail is not None)),
        ],
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane, unsafe_no_auto_barriers=True
        ),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    out, scales = f(*inputs)
    codes = jax.lax.bitcast_convert_type(out, jnp.uint8 if packed else jnp.int8)  # little-endian
    return codes.reshape(m, k * bits // 8), scales
