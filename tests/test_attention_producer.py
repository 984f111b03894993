"""The producer of the exact attention's q, k, v (`pallas_kernels.attention_producer.project_qkv`)
against the unfused path (`attention_producer_reference.projections_reference`, the model's XLA
ops bit for bit).

CPU: Mosaic GPU interpret mode at small shapes (two streams with a ragged last one, one stream read
from a wider fused projection, q/k/v as separate arrays); the CUDA lowering at FLUX's shapes.
`gpu`: the real shapes on the H200.

Bounds (attention_producer_reference.py): v bit for bit; q and k each element within `delta` of
the reference's (a bf16 rounding of the norm or of RoPE one unit away: the norm's mean square is
summed in another order; bit-identical where it rounds alike); q unrotated, RoPE one token off or
another stream's norm weights fail it (`test_bf16_check_catches_a_wrong_producer`). Its tiles
through shared memory (TMA) and register-direct (where TMA cannot copy them) give the same bits
(CPU interpret mode and the GPU).

With `qk_rotation` (the int8 attention's grouped Hadamard after RoPE): the unfused path's q and k
rotated in float32 and rounded to bf16; each element within |H| @ delta (the rotation of the
unrotated bounds) plus one bf16 rounding of each side (2^-8 of the value each: the float32 sums run
in another order); v bit for bit. q left unrotated or rotated by another Hadamard fails it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flux_fixtures
from pallas_kernels.attention_producer import Projection, Stream, project_qkv
from convrot_jax.hadamard import hadamard_matrix
from pallas_kernels.attention_producer_reference import bf16_flip_bounds, normed, projections_reference, rope

EPS = 1e-6
SLACK = 1 + 2.0**-6  # the bounds' own float32 / first-order terms
ROTATION = hadamard_matrix(64)  # the int8 attention's (convrot_jax.ops.QK_ROTATION_GROUP)


def _tables(seq: int, d: int, key) -> tuple[jax.Array, jax.Array]:
    """RoPE tables with FLUX's shape: each angle repeated for its pair; the first 16 features at
    angle 0 (FLUX's first axis, the constant position index), the rest random."""
    angles = jax.random.uniform(key, (seq, d // 2), jnp.float32, 0, 40).at[:, :8].set(0)
    return tuple(jnp.repeat(f(angles), 2, axis=-1) for f in (jnp.cos, jnp.sin))


def _projection(key, batch: int, seq: int, heads: int, d: int, extra: int = 0) -> jax.Array:
    """(B, S, 3 H D + extra) bf16 [q | k | v | extra]: a few large channels in q and k, and in k a
    large value shared by every token (what K's mean removal is for)."""
    boost = np.ones(d, np.float32)
    boost[[1, 5, 9, 14]] = 5
    bias = np.zeros(d, np.float32)
    bias[[1, 5, 9, 14]] = 20
    kq, kk, kv, ke = jax.random.split(key, 4)
    shape = (batch, seq, heads, d)
    q = jax.random.normal(kq, shape) * boost
    k = jax.random.normal(kk, shape) * boost * 0.4 + bias
    v = jax.random.normal(kv, shape) * 3
    parts = [x.reshape(batch, seq, heads * d) for x in (q, k, v)] + [jax.random.normal(ke, (batch, seq, extra))]
    return jnp.concatenate(parts, axis=-1).astype(jnp.bfloat16)


def _weight(key, d: int) -> jax.Array:
    return (1 + 0.2 * jax.random.normal(key, (d,))).astype(jnp.bfloat16)


def _streams(kind: str, batch: int, lengths: tuple[int, ...], heads: int, d: int = 128) -> list[Stream]:
    keys = jax.random.split(jax.random.key(sum(lengths) + batch), 3 * len(lengths))
    out = []
    for i, n in enumerate(lengths):
        x = _projection(keys[3 * i], batch, n, heads, d, extra=256 if kind == "wide" else 0)
        w = d * heads
        if kind == "separate":  # three arrays, each read from column 0
            q, k, v = (Projection(x[..., j * w:(j + 1) * w], 0) for j in range(3))
        else:  # one fused projection output read whole
            q, k, v = (Projection(x, j * w) for j in range(3))
        out.append(Stream(q, k, v, _weight(keys[3 * i + 1], d), _weight(keys[3 * i + 2], d)))
    return out


def test_reference_is_the_model_path():
    """projections_reference computes what FluxAttention's unfused path computes (its RMSNorm
    modules, the streams joined, apply_rotary_emb), bit for bit."""
    from flax import nnx

    from flux_flax.layers import RMSNorm, apply_rotary_emb

    heads, lengths = 2, (64, 72)
    streams = _streams("fused", 2, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(9))
    model = []
    for s in streams:
        norms = []
        for w in (s.q_weight, s.k_weight):
            norm = nnx.eval_shape(lambda: RMSNorm(128, eps=EPS, dtype=jnp.bfloat16))
            norm.weight.set_value(w)
            norms.append(norm)
        cols = lambda p: p.array[..., p.column:p.column + heads * 128].reshape(*p.array.shape[:2], heads, 128)
        model.append((norms[0](cols(s.q)), norms[1](cols(s.k)), cols(s.v)))
    q, k, v = (jnp.concatenate(xs, axis=1) for xs in zip(*model))
    want = (apply_rotary_emb(q, (cos, sin)), apply_rotary_emb(k, (cos, sin)), v)
    got = projections_reference(streams, cos, sin, heads=heads, eps=EPS)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    assert np.array_equal(np.asarray(rope(q, cos, sin), np.float32), np.asarray(want[0], np.float32))


def test_rejects_bad_streams():
    heads = 2
    streams = _streams("fused", 1, (64, 64), heads)
    cos, sin = _tables(128, 128, jax.random.key(1))
    call = functools.partial(project_qkv, heads=heads, eps=EPS, block=128, interpret=True)
    with pytest.raises(ValueError, match="a multiple of the block"):
        call(streams, cos, sin)
    f32 = streams[0]._replace(q=Projection(streams[0].q.array.astype(jnp.float32), 0))
    with pytest.raises(ValueError, match="stream 0 q: want a bfloat16"):
        call([f32], cos[:64], sin[:64])
    with pytest.raises(ValueError, match="stream 0 v: columns"):
        call([streams[0]._replace(v=Projection(streams[0].v.array, 3 * heads * 128 - 4))], cos[:64], sin[:64])
    with pytest.raises(ValueError, match="stream 0 k: columns"):
        call([streams[0]._replace(k=Projection(streams[0].k.array, 1))], cos[:64], sin[:64])
    with pytest.raises(ValueError, match="RoPE tables"):
        call(streams[:1], cos, sin)
    short = _streams("fused", 1, (64, 32), heads)
    with pytest.raises(ValueError, match="the last at least 64 tokens"):
        project_qkv(short, cos[:96], sin[:96], heads=heads, eps=EPS, block=64, interpret=True)
    for shape in ((32, 32), (64, 128), (256, 256)):  # not a multiple of 64, not square, not dividing D
        with pytest.raises(ValueError, match=r"qk_rotation must be \(G, G\)"):
            call(streams, cos, sin, block=64, qk_rotation=jnp.eye(*shape))
    unstaged = _streams("fused", 1, (64, 100), heads)  # 100 tokens: not a multiple of 8, no TMA
    with pytest.raises(ValueError, match="qk_rotation runs on tiles staged"):
        call(unstaged, *_tables(164, 128, jax.random.key(1)), block=64, qk_rotation=ROTATION)


def _lower_at_flux_shapes(batch: int, text: int, image: int, streams: int, attend) -> str:
    """The CUDA IR of `attend(streams, cos, sin, heads, seq)` on FLUX.1's projections (24 heads of
    128; a double block's text and image projections, or a single block's one fused q/k/v/MLP
    projection), lowered from this machine."""
    heads, d, seq = 24, 128, text + image
    widths = [3 * heads * d] * 2 if streams == 2 else [7 * heads * d]
    lengths = [text, image] if streams == 2 else [seq]

    def run(*arrays):
        *xs, w, cos, sin = arrays
        ss = [Stream(*(Projection(x, j * heads * d) for j in range(3)), w[0], w[1]) for x in xs]
        return attend(ss, cos, sin, heads, seq)

    shapes = [jax.ShapeDtypeStruct((batch, n, c), jnp.bfloat16) for n, c in zip(lengths, widths)]
    shapes += [jax.ShapeDtypeStruct((2, d), jnp.bfloat16)] + [jax.ShapeDtypeStruct((seq, d), jnp.float32)] * 2
    return jax.jit(run).trace(*shapes).lower(lowering_platforms=("cuda",)).as_text()


def check_bf16(got, streams, cos, sin, heads: int) -> None:
    """`got` (q, k, v) against the unfused path's, within the module docstring's bounds."""
    qn, kn, _ = normed(streams, heads, EPS)
    want = projections_reference(streams, cos, sin, heads=heads, eps=EPS)
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == jnp.bfloat16 and a.shape == b.shape, (name, a.dtype, a.shape, b.shape)
    assert np.array_equal(f64(got[2]), f64(want[2])), "v"
    for name, a, b, n in (("q", got[0], want[0], qn), ("k", got[1], want[1], kn)):
        err = np.abs(f64(a) - f64(b)) - bf16_flip_bounds(n, b, cos, sin) * SLACK
        assert np.all(err <= 1e-30), f"{np.sum(err > 1e-30)} {name} elements past the bound"


def _rotated(x: jax.Array, rotation: jax.Array) -> jax.Array:
    """x (B, S, H, D) bf16, each group of features times `rotation` in float32, rounded to bf16."""
    g = rotation.shape[0]
    groups = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // g, g)
    return jnp.matmul(groups, rotation, precision="highest").reshape(x.shape).astype(jnp.bfloat16)


def check_rotated(got, streams, cos, sin, heads: int, rotation: jax.Array = ROTATION) -> None:
    """`got` (q, k, v) with q and k rotated, against the unfused path's, within the module
    docstring's bounds."""
    qn, kn, _ = normed(streams, heads, EPS)
    want = projections_reference(streams, cos, sin, heads=heads, eps=EPS)
    f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    assert np.array_equal(f64(got[2]), f64(want[2])), "v"
    g = rotation.shape[0]
    spread = lambda d: np.matmul(d.reshape(*d.shape[:-1], d.shape[-1] // g, g), np.abs(f64(rotation))).reshape(d.shape)
    for name, a, b, n in (("q", got[0], want[0], qn), ("k", got[1], want[1], kn)):
        assert a.dtype == jnp.bfloat16 and a.shape == b.shape, (name, a.dtype, a.shape)
        r = f64(_rotated(b, rotation))
        bound = (spread(bf16_flip_bounds(n, b, cos, sin)) + 2 * 2.0**-8 * np.abs(r)) * SLACK
        err = np.abs(f64(a) - r) - bound
        assert np.all(err <= 1e-30), f"{np.sum(err > 1e-30)} {name} elements past the bound"


@pytest.mark.parametrize("kind, batch, lengths, block", [
    ("fused", 1, (64, 136), 64),  # two streams, the last ragged: its last tile overlaps the one before
    ("separate", 2, (128, 128), 128),  # q, k, v as three arrays, two tiles a program, two batch rows
])
def test_rotated_matches_unfused_path(kind, batch, lengths, block):
    """q and k also rotated by the int8 attention's grouped Hadamard (`qk_rotation`), in place in
    shared memory after RoPE: the unfused path's, rotated, within the bounds."""
    heads = 2
    streams = _streams(kind, batch, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(8))
    got = project_qkv(streams, cos, sin, heads=heads, eps=EPS, block=block, qk_rotation=ROTATION, interpret=True)
    check_rotated(got, streams, cos, sin, heads)


def test_rotated_check_catches_a_wrong_producer():
    """The bound fails q and k left unrotated, and q and k rotated by another Hadamard (Sylvester's)."""
    heads, lengths = 2, (64, 64)
    streams = _streams("fused", 1, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(6))
    q, k, v = projections_reference(streams, cos, sin, heads=heads, eps=EPS)
    check_rotated((_rotated(q, ROTATION), _rotated(k, ROTATION), v), streams, cos, sin, heads)
    sylvester = hadamard_matrix(64, "sylvester")
    for wrong in [(q, k, v), (_rotated(q, sylvester), _rotated(k, sylvester), v)]:
        with pytest.raises(AssertionError):
            check_rotated(wrong, streams, cos, sin, heads)


@pytest.mark.parametrize("batch, text, image, streams", [(1, 512, 4096, 2), (1, 512, 4096, 1), (4, 512, 4080, 2)])
def test_rotated_lowers_for_the_gpu(batch, text, image, streams, monkeypatch):
    """At FLUX.1's shapes the producer with `qk_rotation` lowers for CUDA from this machine, its
    rotation as wgmmas on the staged tiles."""
    from pallas_kernels import tile_schedule

    monkeypatch.setattr(tile_schedule, "sm_count", lambda interpret: 132)

    def attend(ss, cos, sin, heads, seq):
        return project_qkv(ss, cos, sin, heads=heads, eps=EPS, qk_rotation=ROTATION)

    text_ir = _lower_at_flux_shapes(batch, text, image, streams, attend)
    assert "attention_producer" in text_ir and "wgmma" in text_ir and "cp.async.bulk.tensor" in text_ir


@pytest.mark.parametrize("kind, batch, lengths, block", [
    ("fused", 1, (64, 136), 64),  # two streams, the last ragged: its last tile overlaps the one before
    ("separate", 2, (128, 128), 128),  # q, k, v as three arrays, two tiles a program, two batch rows
    ("wide", 1, (100,), 128),  # one stream from a wider array (FLUX's single blocks), shorter than a block
])
def test_bf16_matches_unfused_path(kind, batch, lengths, block):
    heads = 2
    streams = _streams(kind, batch, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(5))
    got = project_qkv(streams, cos, sin, heads=heads, eps=EPS, block=block, interpret=True)
    check_bf16(got, streams, cos, sin, heads)


def test_repeated_calls_share_one_traced_kernel():
    """As for the other kernels: the blocks of a model call the producer at the same shapes, and
    every such call shares one traced (and lowered) kernel."""
    heads, lengths = 2, (64, 64)
    streams = _streams("fused", 1, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(7))

    def two_blocks(shift):
        moved = []
        for s in streams:  # the next block's projection: another array, read at the same columns
            x = s.q.array + shift
            moved.append(s._replace(**{n: getattr(s, n)._replace(array=x) for n in "qkv"}))
        return [project_qkv(x, cos, sin, heads=heads, eps=EPS, block=64, interpret=True) for x in (streams, moved)]

    launches = [e.params["jaxpr"] for e in jax.make_jaxpr(two_blocks)(jnp.bfloat16(1)).eqns
                if e.primitive.name in ("jit", "pjit") and e.params["name"] == "_launch"]
    assert len(launches) == 2 and len({id(j) for j in launches}) == 1


def test_bf16_check_catches_a_wrong_producer():
    """The bound fails q left unrotated, RoPE's table one token off, or k normed with the other
    stream's weights."""
    heads, lengths = 2, (64, 64)
    streams = _streams("fused", 1, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(6))
    q, k, v = projections_reference(streams, cos, sin, heads=heads, eps=EPS)
    check_bf16((q, k, v), streams, cos, sin, heads)
    qn, _, _ = normed(streams, heads, EPS)
    swapped = [s._replace(k_weight=streams[1 - i].k_weight) for i, s in enumerate(streams)]
    _, k_swapped, _ = projections_reference(swapped, cos, sin, heads=heads, eps=EPS)
    shifted = projections_reference(streams, jnp.roll(cos, 1, axis=0), jnp.roll(sin, 1, axis=0), heads=heads, eps=EPS)
    for wrong in [(qn, k, v), shifted, (q, k_swapped, v)]:
        with pytest.raises(AssertionError):
            check_bf16(wrong, streams, cos, sin, heads)


@pytest.mark.parametrize("batch, text, image, streams", [
    (1, 512, 4096, 2), (4, 512, 8192, 2), (1, 512, 4096, 1), (4, 512, 4096, 2),
    (1, 512, 4080, 2), (4, 512, 4080, 2),  # 1360x768: a ragged image stream
    (4, 512, 8160, 2),  # 1920x1088: ragged, S = 8672
    (1, 512, 3969, 2),  # 1008x1008: 63² image tokens, not a multiple of 8: the tiles move register-direct
])
def test_bf16_lowers_for_the_gpu(batch, text, image, streams, monkeypatch):
    """At FLUX.1's shapes the bf16 producer and an attention on its output lower for CUDA from this
    machine (XLA's attention: cuDNN's checks for the library at trace); the tiles go through
    shared memory by TMA exactly when the image tokens are a multiple of 8 (`stageable`)."""
    from pallas_kernels import tile_schedule

    monkeypatch.setattr(tile_schedule, "sm_count", lambda interpret: 132)

    def attend(ss, cos, sin, heads, seq):
        return jax.nn.dot_product_attention(*project_qkv(ss, cos, sin, heads=heads, eps=EPS), implementation="xla")

    text_ir = _lower_at_flux_shapes(batch, text, image, streams, attend)
    assert "attention_producer" in text_ir
    assert ("cp.async.bulk.tensor" in text_ir) == (image % 8 == 0)  # the producer is the IR's only Mosaic kernel


def _bf16_register_direct(streams, cos, sin, heads: int, **kwargs):
    """`project_qkv` with its tiles moved register-direct, as when TMA cannot copy them."""
    from pallas_kernels import attention_producer

    with pytest.MonkeyPatch.context() as m:
        m.setattr(attention_producer, "stageable", lambda streams: False)
        return project_qkv(streams, cos, sin, heads=heads, eps=EPS, **kwargs)


@pytest.mark.parametrize("kind, batch, lengths, block", [
    ("fused", 1, (64, 136), 64),  # the last stream ragged: a moved-back tile, 8-row aligned
    ("separate", 2, (128, 200), 128),  # two tiles a program, two batch rows, the last block's two tiles overlap
])
def test_bf16_staged_is_register_direct_bit_for_bit(kind, batch, lengths, block):
    """The tiles through shared memory (TMA in and out) give the register-direct path's q, k, v
    bit for bit: the same `_norm_rope` on the same WGMMA-layout registers."""
    heads = 2
    streams = _streams(kind, batch, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(4))
    got = project_qkv(streams, cos, sin, heads=heads, eps=EPS, block=block, interpret=True)
    want = _bf16_register_direct(streams, cos, sin, heads, block=block, interpret=True)
    for name, a, b in zip("qkv", got, want):
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)), name


# ------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("lengths, heads", [((512, 4096), 24), ((512, 1000), 2)])
def test_gpu_bf16_matches_unfused_path(lengths, heads):
    """The bf16 mode at FLUX's 1024² joint sequence with all 24 heads, and a ragged image stream."""
    streams = _streams("fused", 1, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(3))
    check_bf16(project_qkv(streams, cos, sin, heads=heads, eps=EPS), streams, cos, sin, heads)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, lengths, heads", [(1, (512, 4096), 24), (2, (512, 4080), 24), (1, (512, 1000), 2)])
def test_gpu_rotated_matches_unfused_path(batch, lengths, heads):
    """`qk_rotation` on the GPU: 1024², 1360x768 with two images, a short ragged stream."""
    streams = _streams("fused", batch, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(3))
    got = project_qkv(streams, cos, sin, heads=heads, eps=EPS, qk_rotation=ROTATION)
    check_rotated(got, streams, cos, sin, heads)


@pytest.mark.gpu
@pytest.mark.parametrize("batch, lengths, heads", [(1, (512, 4096), 24), (2, (512, 4080), 24), (1, (512, 1000), 2)])
def test_gpu_bf16_staged_is_register_direct_bit_for_bit(batch, lengths, heads):
    """On the GPU the TMA-staged tiles give the register-direct path's q, k, v bit for bit (1024²,
    1360x768 with two images, a short ragged stream)."""
    streams = _streams("fused", batch, lengths, heads)
    cos, sin = _tables(sum(lengths), 128, jax.random.key(2))
    got = project_qkv(streams, cos, sin, heads=heads, eps=EPS)
    want = _bf16_register_direct(streams, cos, sin, heads)
    for name, a, b in zip("qkv", got, want):
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)), name


# ------------------------------------------------------------------------------------ in the model
def _lower_dev_model(model, image: int = 4096) -> str:
    """The CUDA IR of a FLUX.1-dev-wide transformer's (abstract) forward: 512 text + `image` image
    tokens (4096: 1024²), batch 1."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    s = jax.ShapeDtypeStruct
    args = (s((1, image, 64), jnp.bfloat16), s((1, 512, 4096), jnp.bfloat16), s((1, 768), jnp.bfloat16),
            s((1,), jnp.float32), s((image, 3), jnp.float32), s((512, 3), jnp.float32), s((1,), jnp.float32))
    return jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a)).trace(state, *args).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("impl, image, produced, rotated_in_xla", [
    ("sage8", 4096, False, False),  # 1024²: the producer serves the exact attention and int8 only
    ("int8", 4096, True, False),  # 1024²: norm, RoPE and the grouped Hadamard in the producer
    ("int8", 3969, False, True),  # 1008²: 63² image tokens cannot be staged: XLA's ops and rotation
])
def test_model_lowers_for_the_gpu(impl, image, produced, rotated_in_xla, monkeypatch):
    """A FLUX.1-dev-wide transformer (1 double + 1 single block, fused projections, bf16, the
    producer on: the default) with an 8-bit attention lowers for CUDA with that kernel in both
    blocks; its q, k, v from one producer launch a block where `ops.fuses_attention_producer`
    admits it, else from XLA's ops, with int8's rotation a dot by the (64, 64) Hadamard."""
    import contextlib
    import re

    from flax import nnx

    from convrot_jax import ops
    from flux_flax import FluxConfig, FluxTransformer2DModel, fuse_projections
    from pallas_kernels import attention

    monkeypatch.setattr(attention, "sm_count", lambda interpret: 132)  # the persistent grid at these lengths
    monkeypatch.setattr(ops, "pallas_supported", lambda: True)
    config = FluxConfig.dev(num_layers=1, num_single_layers=1)
    model = nnx.eval_shape(lambda: fuse_projections(FluxTransformer2DModel(
        config, dtype=jnp.bfloat16, attention_impl=impl, rngs=nnx.Rngs(0))))
    ops._warn_once.cache_clear()
    unstaged = impl == "int8" and not produced  # warned: `test_int8_warns_where_the_producer_cannot_stage`
    with pytest.warns(UserWarning, match="cannot stage") if unstaged else contextlib.nullcontext():
        hlo = _lower_dev_model(model, image)
    assert f"flash_attention_{impl}" in hlo
    assert len(set(re.findall(r"attention_producer_\d+", hlo))) == (2 if produced else 0)
    assert bool(re.search(r"dot_general.*tensor<64x64xbf16>", hlo)) == rotated_in_xla


def test_model_int8_producer_wiring(monkeypatch):
    """FluxConfig.small in bf16 (2 double + 2 single blocks, fused projections; 128 text + 72 image
    tokens, 2 images) with the "int8" attention, its kernel replaced by the exact attention on the
    operands it would take (the kernel runs on the GPU only): with the producer on, every block
    calls it with the (64, 64) regular Hadamard as `qk_rotation` and hands its q, k, v to the
    kernel unchanged; with the producer replaced by the unfused path's own ops (norm, RoPE, then
    `ops.attention`'s rotation), the output is the unfused model's bit for bit. The producer's
    rotation itself: `test_rotated_matches_unfused_path`."""
    from flax import nnx

    from convrot_jax import ops
    from convrot_jax.hadamard import rotate
    from flux_flax import FluxConfig, FluxTransformer2DModel, fuse_projections, set_attention

    config = FluxConfig.small()
    model = fuse_projections(FluxTransformer2DModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    inputs = {k: jnp.asarray(v) for k, v in flux_fixtures.flux_inputs(config, height=8, width=9, text_len=128).items()}
    monkeypatch.setattr(ops, "pallas_supported", lambda: True)
    taken = []

    def kernel(q, k, v, implementation):
        assert implementation == "int8"
        taken.append((q, k, v))
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")

    monkeypatch.setattr(ops, "_kernel_attention", kernel)
    forward = jax.jit(lambda m, kw: m(**kw))
    set_attention(model, "int8", qk_producer=False)
    off = np.asarray(forward(model, inputs), np.float32)
    assert len(taken) == config.num_layers + config.num_single_layers
    set_attention(model, "int8", qk_producer=True)

    made = []

    def producer(streams, cos, sin, *, heads, eps, qk_rotation):
        q, k, v = projections_reference(streams, cos, sin, heads=heads, eps=eps)
        rot = lambda x: rotate(x, group_size=qk_rotation.shape[0], method="matmul").astype(x.dtype)
        made.append((qk_rotation, (rot(q), rot(k), v)))
        return made[-1][1]

    monkeypatch.setattr(ops, "_project_qkv", producer)
    taken.clear()
    model(**inputs)  # eager: the matrix and the operands stay concrete
    assert len(made) == len(taken) == config.num_layers + config.num_single_layers
    for (rotation, qkv), operands in zip(made, taken):
        np.testing.assert_array_equal(np.asarray(rotation, np.float32), np.asarray(ROTATION, np.float32))
        assert all(a is b for a, b in zip(qkv, operands))
    np.testing.assert_array_equal(np.asarray(forward(model, inputs), np.float32), off)


def test_int8_warns_where_the_producer_cannot_stage(monkeypatch):
    """"int8" takes the producer where it can stage the tiles; where it cannot (a stream not a
    multiple of 8 tokens: 1008² has 63² image tokens) the slower XLA path runs with a warning naming
    the streams. The exact attention takes those streams register-direct; sage8 never takes it."""
    import warnings

    from convrot_jax import ops

    monkeypatch.setattr(ops, "pallas_supported", lambda: True)
    ops._warn_once.cache_clear()
    staged, unstaged = _streams("fused", 1, (128, 72), 2), _streams("fused", 1, (128, 65), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.fuses_attention_producer("int8", staged, qk_producer=True)
        assert ops.fuses_attention_producer("cudnn", unstaged, qk_producer=True)
        assert not ops.fuses_attention_producer("sage8", staged, qk_producer=True)
        assert not ops.fuses_attention_producer("int8", staged, qk_producer=False)
    with pytest.warns(UserWarning, match=r"'int8'.*streams of \[128, 65\] tokens"):
        assert not ops.fuses_attention_producer("int8", unstaged, qk_producer=True)


def test_model_qk_producer_matches_unfused(monkeypatch):
    """FluxConfig.small in bf16 (2 double + 2 single blocks, fused projections; 128 text + 72
    image tokens, the last run ragged, 2 images) with `set_attention(model, None, qk_producer=True)`
    on the exact XLA attention (interpret mode standing in for the GPU):
    1. every block's attention takes q, k, v from the producer, each within `check_bf16`'s bound
       of the unfused path on that block's own projections (`projections_reference`, the model's
       unfused path bit for bit: `test_reference_is_the_model_path`);
    2. with the producer replaced by that reference, the output is the unfused model's bit for
       bit: the wiring around it (streams, norm weights, eps, RoPE tables, the output's [text,
       image] split) is exact. Switched off again, the unfused graph returns."""
    from flax import nnx

    from convrot_jax import ops
    from flux_flax import FluxConfig, FluxTransformer2DModel, fuse_projections, set_attention
    from pallas_kernels import attention_producer

    config = FluxConfig.small()
    model = fuse_projections(FluxTransformer2DModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    inputs = {k: jnp.asarray(v) for k, v in flux_fixtures.flux_inputs(config, height=8, width=9, text_len=128).items()}
    forward = jax.jit(lambda m, kw: m(**kw))
    off = np.asarray(forward(model, inputs), np.float32)
    monkeypatch.setattr(ops, "pallas_supported", lambda: True)
    set_attention(model, None, qk_producer=True)

    calls = []

    def producer(streams, cos, sin, *, heads, eps):
        # Waited for: the interpreted kernel's callbacks run JAX ops, and with the eager model
        # dispatching the next ops behind it the CPU client deadlocked (the kernel is jitted).
        out = jax.block_until_ready(attention_producer.project_qkv(streams, cos, sin, heads=heads, eps=eps,
                                                                   interpret=True))
        calls.append((streams, cos, sin, heads, eps, out))
        return out

    monkeypatch.setattr(ops, "_project_qkv", producer)
    on = np.asarray(model(**inputs), np.float32)  # eager: each call's operands stay concrete
    assert len(calls) == config.num_layers + config.num_single_layers and np.all(np.isfinite(on))
    for streams, cos, sin, heads, eps, out in calls:
        assert eps == EPS and heads == config.num_attention_heads
        check_bf16(out, streams, cos, sin, heads)

    monkeypatch.setattr(ops, "_project_qkv", lambda streams, cos, sin, *, heads, eps: projections_reference(
        streams, cos, sin, heads=heads, eps=eps))
    np.testing.assert_array_equal(np.asarray(forward(model, inputs), np.float32), off)
    set_attention(model, None, qk_producer=False)
    assert not model.transformer_blocks[0].attn.qk_producer
    np.testing.assert_array_equal(np.asarray(forward(model, inputs), np.float32), off)


def test_model_qk_producer_lowers_for_the_gpu(monkeypatch):
    """A FLUX.1-dev-wide transformer (1 double + 1 single block, fused projections, bf16) with the
    bf16 producer on at 1024² (512 text + 4096 image tokens) lowers for CUDA with one producer
    launch a block and no other q/k/v producer (XLA's attention: cuDNN's checks for the library
    at trace)."""
    import re

    from flax import nnx

    from convrot_jax import ops
    from flux_flax import FluxConfig, FluxTransformer2DModel, fuse_projections, set_attention
    from pallas_kernels import tile_schedule

    monkeypatch.setattr(tile_schedule, "sm_count", lambda interpret: 132)
    monkeypatch.setattr(ops, "pallas_supported", lambda: True)
    config = FluxConfig.dev(num_layers=1, num_single_layers=1)
    model = nnx.eval_shape(lambda: fuse_projections(FluxTransformer2DModel(config, dtype=jnp.bfloat16,
                                                                           rngs=nnx.Rngs(0))))
    set_attention(model, "xla", qk_producer=True)
    hlo = _lower_dev_model(model)
    assert len(set(re.findall(r"attention_producer_\d+", hlo))) == 2
