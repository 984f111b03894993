"""Attention: the Pallas Mosaic GPU kernels (bf16 and 8-bit) against cuDNN bf16 flash attention.

Implementations (x FLUX joint sequences 1536 / 4608 / 8704: 512 text + 1024 / 4096 / 8192 image
tokens, i.e. 512², 1024² and 2048x1024 images; batch 1 and 4; 24 heads x 128):
  cudnn_bf16        jax.nn.dot_product_attention(implementation="cudnn"), bf16 (the baseline)
  mosaic_bf16       pallas_kernels.attention, precision="bf16"
  sage8_int8        pallas_kernels.attention, precision="sage8", int8 QK^T (quantize_qkv + kernel)
  sage8_fp8         the same with fp8 e4m3 QK^T
  sage_qk8          pallas_kernels.attention, precision="sage_qk8": int8 QK^T, bf16 PV
  sage_qk8_rot, sage8_rot: the same on q, k rotated along D by ConvRot's grouped Hadamard first
                    (the rotation's cost and accuracy gain; not in the model)
  int8              pallas_kernels.attention, precision="int8": int8 QK^T and int8 PV (P against each
                    row's max in its KV block, V less its mean)
  int8_rot          int8 on q, k rotated first, as sage_qk8_rot (XLA butterfly, rounded to bf16; the
                    model's "int8" rotates by a matmul, also rounded to bf16: convrot_jax.ops.attention);
                    int8_kernel: the int8-PV kernel alone on pre-quantized operands
  sage8_int8_kernel the int8 kernel alone, on operands quantize_qkv made beforehand
  sage8_fp8_kernel  the fp8-QK kernel alone (its logits come out of the wgmma as float32)
  int8_kernel_persistent, sage8_int8_kernel_persistent: those kernels on a persistent grid, one
                    CTA an SM running its tiles back to back (AttentionConfig.programs)
  sage8_int8_overlap_kernel: the same, overlapped (AttentionConfig.overlap, below)
  sage8_int8_2stages, sage8_int8_kv64: other block configs of sage8_int8
  sage8_int8_overlap: sage8_int8 with FlashAttention-3's intra-warpgroup overlap
                    (AttentionConfig.overlap; the default of mosaic_bf16)
  mosaic_bf16_no_overlap: mosaic_bf16 without it; sage_qk8_overlap: sage_qk8 as it was before
                    block_kv 192 (128 keys a step, 3 stages, overlapped)
With the producer (from a double block's text and image q/k/v projection outputs, bf16: per-head
QK RMSNorm, RoPE, the attention; what the model runs; ratios against rope_cudnn_bf16):
  rope_cudnn_bf16   XLA QK-norm + RoPE (the model's unfused ops) + cuDNN bf16 (the baseline)
  fused_cudnn_bf16  pallas_kernels.attention_producer.project_qkv (bf16 q, k, v written in the joint
                    layout: one Mosaic GPU launch) + cuDNN bf16 (the model's qk_producer option)
  rope_sage8_xla    XLA QK-norm + RoPE + quantize_qkv (XLA) + the int8 sage8 kernel (the model's sage8)
  fused_bf16_sage8  project_qkv (bf16 q, k, v, one launch) + quantize_qkv (XLA) + the int8 sage8 kernel
  rope_int8_rot_xla XLA QK-norm + RoPE, then convrot_jax.ops.attention(implementation="int8"): q and k
                    rotated (cuBLAS), quantize_qkv, the int8 kernel (the model's "int8")
  fused_int8_rot    convrot_jax.ops.attention_from_projections(implementation="int8"): project_qkv with
                    qk_rotation (norm, RoPE and the grouped Hadamard of q and k in one launch) +
                    quantize_qkv + the int8 kernel (the model's "int8" with its producer, the default)
TFLOP/s = 4 B H S^2 D / time (the two matmuls; 8-bit counted the same); ratios = cuDNN time /
this time. Device time (CUPTI), median of 20 over rotating input sets (> 2x the 50 MB L2).
All implementations run in one process, back to back (same device state).

Accuracy: relative L2 of each implementation's output against float32 attention (XLA) on the
same bf16 inputs, random N(0, 1) and FLUX-like (pallas_kernels.attention_reference.flux_like_qkv:
a few large-norm channels in q and k, a large shared mean in k), at sequence 4608, batch 1.

Stages (--stages, default tests,bench):
  tests  `pytest tests/test_attention.py`, then tests/test_attention_producer.py (--tests-k: -k for both).
  sweep  block configs (block_kv, stages, overlap) of each precision (--sweep-precisions) at B=1
         S=4608 and B=4 S=8704 (the 8-bit kernels alone, on operands quantized beforehand).
  bench  timing grid + accuracy.
  ncu    Nsight Compute counters of the --ncu-variants kernels alone (pre-quantized operands) at
         B=1 S=4608, one launch each (attention_ncu.txt).
  trace  Mosaic GPU's in-kernel profiler on the --trace-variants kernels alone at --trace-cells:
         cycles a KV step in each named scope (the default loop has them, not the overlapped
         one), what the other compute warpgroup does meanwhile, how busy the SMs are over the
         launch (benchmarks/attention_trace.py). The profiler slows the kernel (1.85x measured):
         read it as where the warps wait (benchmarks/notes/attention.md v16).
  model  FLUX.1-dev transformer with random bf16 weights at 1024²: velocity cosine and final
         latent relative L2 after 28 steps, 8-bit attention (--model-impls, default sage8 and
         sage_qk8) vs cuDNN bf16 attention, same inputs (flux_flax.set_attention).

    PYTHONPATH=. python3 -m benchmarks.bench_attention [--stages tests,bench,model] [--update]
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import Variant

NAME = "attention"
MODULE = "benchmarks.bench_attention"
BASELINE = "cudnn_bf16"
_GROUP = "attention"  # one process: the same device state for every implementation
VARIANTS = harness.registry(
    Variant("cudnn_bf16", "jax.nn.dot_product_attention, cuDNN, bf16", group=_GROUP),
    Variant("mosaic_bf16", "pallas_kernels.attention, bf16", group=_GROUP, options={"precision": "bf16"}),
    Variant("sage8_int8", "pallas_kernels.attention, sage8, int8 QK", group=_GROUP,
            options={"precision": "sage8", "qk": "int8"}),
    Variant("sage8_fp8", "pallas_kernels.attention, sage8, fp8 QK", group=_GROUP,
            options={"precision": "sage8", "qk": "fp8"}),
    Variant("sage_qk8", "pallas_kernels.attention, sage_qk8 (int8 QK, bf16 PV)", group=_GROUP,
            options={"precision": "sage_qk8", "qk": "int8"}),
    Variant("sage_qk8_rot", "sage_qk8 on q, k rotated by a grouped Hadamard (64) first", group=_GROUP,
            options={"precision": "sage_qk8", "qk": "int8", "rotate_qk": True}),
    Variant("sage8_rot", "sage8 (int8 QK) on q, k rotated by a grouped Hadamard (64) first", group=_GROUP,
            options={"precision": "sage8", "qk": "int8", "rotate_qk": True}),
    Variant("int8", "pallas_kernels.attention, int8 (int8 QK, int8 PV)", group=_GROUP,
            options={"precision": "int8", "qk": "int8"}),
    Variant("int8_rot", "int8 on q, k rotated by a grouped Hadamard (64) first", group=_GROUP,
            options={"precision": "int8", "qk": "int8", "rotate_qk": True}),
    Variant("int8_kernel", "the int8-PV kernel on pre-quantized operands", group=_GROUP,
            options={"precision": "int8", "qk": "int8", "prequantized": True}),
    Variant("sage8_int8_kernel", "the int8 sage8 kernel on pre-quantized operands", group=_GROUP,
            options={"precision": "sage8", "qk": "int8", "prequantized": True}),
    Variant("int8_kernel_persistent", "int8_kernel on a persistent grid, one CTA an SM (AttentionConfig.programs)",
            group=_GROUP, options={"precision": "int8", "qk": "int8", "prequantized": True,
                                   "config": {"programs": "sms"}}),
    Variant("sage8_int8_kernel_persistent", "sage8_int8_kernel on a persistent grid, one CTA an SM", group=_GROUP,
            options={"precision": "sage8", "qk": "int8", "prequantized": True, "config": {"programs": "sms"}}),
    Variant("sage8_fp8_kernel", "the fp8-QK sage8 kernel on pre-quantized operands (no int32 logits)",
            group=_GROUP, options={"precision": "sage8", "qk": "fp8", "prequantized": True}),
    Variant("sage8_int8_2stages", "sage8_int8 with 2 K/V stages (default 3)", group=_GROUP,
            options={"precision": "sage8", "qk": "int8", "config": {"max_concurrent_steps": 2}}),
    Variant("sage8_int8_kv64", "sage8_int8 with block_kv 64, 4 stages", group=_GROUP,
            options={"precision": "sage8", "qk": "int8", "config": {"block_kv": 64, "max_concurrent_steps": 4}}),
    Variant("mosaic_bf16_no_overlap", "mosaic_bf16 without FlashAttention-3's intra-warpgroup overlap",
            group=_GROUP, options={"precision": "bf16", "config": {"overlap": False}}),
    Variant("sage8_int8_overlap", "sage8_int8 overlapped (fp8 PV accumulated in place)", group=_GROUP,
            options={"precision": "sage8", "qk": "int8", "config": {"overlap": True}}),
    Variant("sage8_int8_overlap_kernel", "the overlapped int8 sage8 kernel on pre-quantized operands", group=_GROUP,
            options={"precision": "sage8", "qk": "int8", "prequantized": True, "config": {"overlap": True}}),
    Variant("sage_qk8_overlap", "sage_qk8 at block_kv 128, 3 stages, overlapped", group=_GROUP,
            options={"precision": "sage_qk8", "qk": "int8",
                     "config": {"block_kv": 128, "max_concurrent_steps": 3, "overlap": True}}),
    Variant("rope_cudnn_bf16", "XLA QK-norm + RoPE, cuDNN bf16", group=_GROUP, options={"producer": "xla"}),
    Variant("fused_cudnn_bf16", "bf16 producer (attention_producer.project_qkv), cuDNN bf16", group=_GROUP,
            options={"producer": "fused"}),
    Variant("rope_sage8_xla", "XLA QK-norm + RoPE + XLA quantize_qkv, sage8 int8 kernel", group=_GROUP,
            options={"producer": "xla", "precision": "sage8"}),
    Variant("fused_bf16_sage8", "bf16 producer (project_qkv) + XLA quantize_qkv, sage8 int8 kernel", group=_GROUP,
            options={"producer": "fused", "precision": "sage8"}),
    Variant("rope_int8_rot_xla", "XLA QK-norm + RoPE + rotation (cuBLAS) + XLA quantize_qkv, int8 kernel", group=_GROUP,
            options={"producer": "xla", "precision": "int8", "rotate_qk": True}),
    Variant("fused_int8_rot", "ops.attention_from_projections: producer with the rotation + XLA quantize_qkv, int8 kernel",
            group=_GROUP, options={"producer": "fused", "precision": "int8", "rotate_qk": True}),
)
PRODUCER_BASELINE = "rope_cudnn_bf16"
TEXT_TOKENS = 512
HEADS, HEAD_DIM = 24, 128
SEQS = (1536, 4608, 8704)
BATCHES = (1, 4)
ACCURACY_SEQ = 4608


def shapes(seqs, batches, cells=None) -> dict[str, dict[str, int]]:
    """Named (batch, sequence) cells: `cells` ("BxS" strings) in order, else batches x seqs."""
    pairs = [tuple(int(x) for x in c.lower().split("x")) for c in cells] if cells else \
        [(b, s) for b in batches for s in seqs]
    return {f"B={b} S={s}": {"b": b, "s": s} for b, s in pairs}


def tflops(b: int, s: int, ms: float) -> float:
    return 4 * b * HEADS * s * s * HEAD_DIM / (ms * 1e-3) / 1e12


def _qk_dtype(name: str):
    import jax.numpy as jnp

    return {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[name]


def _config(opts: dict):
    """A variant's AttentionConfig: its precision's default with the variant's changes
    ("programs": "sms", the device's SM count)."""
    from pallas_kernels.attention import default_config
    from pallas_kernels.tile_schedule import sm_count

    changes = dict(opts.get("config", {}))
    if changes.get("programs") == "sms":
        changes["programs"] = sm_count(interpret=False)
    return dataclasses.replace(default_config(opts["precision"]), **changes)


def _prequantized(make, config, *, qk: str = "int8", precision: str = "sage8"):
    """make(i) -> (q, k, v) turned into make(i) -> (the 8-bit kernel's operands,), quantized for
    `config` (its K scales are per block_kv keys) before the timing starts."""
    import functools

    import jax

    from pallas_kernels.attention import quantize_qkv

    quant = jax.jit(functools.partial(quantize_qkv, config=config, qk_dtype=_qk_dtype(qk), precision=precision))
    return lambda i: (jax.block_until_ready(quant(*make(i))),)


def implementation(variant: str):
    """variant -> fn(q, k, v) (or fn(qkv) for the pre-quantized kernel)."""
    import functools

    import jax

    from pallas_kernels.attention import attention, attention_quantized

    if variant == BASELINE:
        return functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    opts = VARIANTS[variant].options
    if opts.get("prequantized"):
        return functools.partial(attention_quantized, config=_config(opts))
    kernel = functools.partial(attention, precision=opts["precision"], qk_dtype=_qk_dtype(opts.get("qk", "int8")),
                               config=_config(opts))
    return _rotating_qk(kernel) if opts.get("rotate_qk") else kernel


def _rotating_qk(kernel):
    """kernel(q, k, v) on q and k rotated along the head dim by ConvRot's grouped regular Hadamard
    (`convrot_jax.hadamard.rotate`, groups of 64; orthogonal, so q k^T is unchanged): large-norm
    channels spread over their group before the 8-bit codes (benchmarks/notes/attention.md v8:
    emulated, sage_qk8's FLUX-like error 2.04% -> 0.83%); rounded back to bf16 as the kernel takes
    q and k."""
    from convrot_jax.hadamard import rotate

    def fn(q, k, v):
        rot = lambda x: rotate(x, group_size=64).astype(x.dtype)
        return kernel(rot(q), rot(k), v)
    return fn


def producer_implementation(variant: str):
    """variant -> fn(text, image, weights, cos, sin): from a double block's projection outputs
    (B, 512, 3 H D) and (B, S - 512, 3 H D), the norm weights (4, D) (text q, k, image q, k) and
    the RoPE tables (S, D), the attention output."""
    import jax

    from pallas_kernels.attention import attention
    from pallas_kernels.attention_producer import project_qkv
    from pallas_kernels.attention_producer_reference import projections_reference

    from convrot_jax import ops

    opts = VARIANTS[variant].options
    fused, rotate = opts["producer"] == "fused", opts.get("rotate_qk", False)
    make = project_qkv if fused else projections_reference

    def fn(text, image, weights, cos, sin):
        streams = _streams(text, image, weights)
        if rotate and fused:  # the model's path (its rotation in the producer), so it cannot drift from it
            return ops.attention_from_projections(streams, cos, sin, heads=HEADS, eps=1e-6,
                                                  implementation=opts["precision"])
        q, k, v = make(streams, cos, sin, heads=HEADS, eps=1e-6)
        if "precision" not in opts:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
        if rotate:  # the model's unfused path: its rotation, then the kernel
            return ops.attention(q, k, v, implementation=opts["precision"])
        return attention(q, k, v, precision=opts["precision"])
    return fn


def _streams(text, image, weights) -> list:
    """The double block's two streams (attention_producer.Stream) of `producer_implementation`'s inputs."""
    from pallas_kernels.attention_producer import Projection, Stream

    width = HEADS * HEAD_DIM
    return [Stream(*(Projection(x, i * width) for i in range(3)), weights[2 * j], weights[2 * j + 1])
            for j, x in enumerate((text, image))]


def _projection_inputs(b: int, s: int, seed: int):
    import jax
    import jax.numpy as jnp

    ks = jax.random.split(jax.random.key(seed), 4)
    # Drawn in float32, then rounded: jax.random.normal in bfloat16 takes only ~128 distinct values,
    # whose fp8 rounding errors do not average out (V's mean over keys is what near-uniform
    # attention returns): on such inputs sage8's operands alone (P exact, S = 1536, two heads; CPU)
    # were 6.9% off float32 attention, against 2.9% drawn in float32 (benchmarks/notes/attention.md v7).
    proj = lambda key, n: jax.random.normal(key, (b, n, 3 * HEADS * HEAD_DIM), jnp.float32).astype(jnp.bfloat16)
    angles = jax.random.uniform(ks[3], (s, HEAD_DIM // 2), jnp.float32, 0, 60)
    tables = [jnp.repeat(f(angles), 2, axis=-1) for f in (jnp.cos, jnp.sin)]
    weights = (1 + 0.1 * jax.random.normal(ks[2], (4, HEAD_DIM))).astype(jnp.bfloat16)
    return jax.block_until_ready((proj(ks[0], TEXT_TOKENS), proj(ks[1], s - TEXT_TOKENS), weights, *tables))


def _inputs(b: int, s: int, seed: int):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.attention_reference import random_qkv

    return jax.block_until_ready(random_qkv(jax.random.key(seed), (b, s, HEADS, HEAD_DIM), jnp.bfloat16))


def work_grid(args) -> dict:
    acc = accuracy(args)
    rows = []
    for variant in args.variants:
        fn = producer_implementation(variant) if "producer" in VARIANTS[variant].options else implementation(variant)

        def setup(d, variant=variant, fn=fn):
            b, s = d["b"], d["s"]
            if "producer" in VARIANTS[variant].options:
                return fn, (lambda i: _projection_inputs(b, s, 100 + i)), b * s * HEADS * HEAD_DIM * 2
            opts = VARIANTS[variant].options
            if opts.get("prequantized"):
                make = _prequantized(lambda i: _inputs(b, s, 100 + i), _config(opts), qk=opts["qk"],
                                     precision=opts["precision"])
                return (lambda qkv: fn(qkv, seq=s)), make, b * s * HEADS * HEAD_DIM * 2
            return fn, (lambda i: _inputs(b, s, 100 + i)), b * s * HEADS * HEAD_DIM * 2

        rows += harness.time_grid(shapes(args.seqs, args.batches, args.cells), variant, setup,
                                  lambda d, ms: {"tflops": tflops(d["b"], d["s"], ms)}, deadline=args.deadline)
    return {"rows": rows, "accuracy": acc}


SWEEP = {  # precision -> (block_kv, max_concurrent_steps, overlap) candidates
    "sage8": [(128, 3, False), (192, 2, False), (192, 3, False), (256, 2, False), (128, 3, True), (192, 2, True)],
    "sage_qk8": [(128, 3, True), (128, 3, False), (192, 2, True), (192, 2, False)],
    "bf16": [(128, 2, True), (192, 2, True)],
    "int8": [(128, 3, False), (192, 2, False), (192, 3, False), (256, 2, False)],  # "int8" is never overlapped
}


def work_sweep(args) -> list[dict]:
    """Block configs of each precision at the large shapes, each checked (rel L2 against cuDNN);
    the 8-bit kernels timed alone, on operands quantized beforehand for that config (its K
    scales are per block_kv keys)."""
    import functools

    import jax

    from pallas_kernels.attention import AttentionConfig, attention, attention_quantized
    from pallas_kernels.attention_reference import rel_l2

    rows = []
    for b, s in ((1, 4608), (4, 8704)):
        make = lambda i, b=b, s=s: _inputs(b, s, 300 + i)
        base_ms = harness.device_time_ms(implementation(BASELINE), make, b * s * HEADS * HEAD_DIM * 2)
        rows.append({"b": b, "s": s, "config": "cudnn_bf16", "ms": base_ms, "tflops": tflops(b, s, base_ms)})
        q, k, v = make(0)
        ref = jax.jit(implementation(BASELINE))(q, k, v)
        for precision in args.sweep_precisions:
            for block_kv, stages, overlap in SWEEP[precision]:
                if time.time() > args.deadline:
                    return rows
                cfg = AttentionConfig(block_kv=block_kv, max_concurrent_steps=stages, overlap=overlap)
                fn = functools.partial(attention, precision=precision, config=cfg)
                row = {"b": b, "s": s, "config": f"{precision} block_kv={block_kv} stages={stages}"
                                                 f"{' overlap' if overlap else ''}"}
                timed, timed_make = fn, make
                if precision != "bf16":
                    timed = functools.partial(attention_quantized, seq=s, config=cfg)
                    timed_make = _prequantized(make, cfg, precision=precision)
                try:
                    row["rel_l2_vs_cudnn"] = rel_l2(jax.jit(fn)(q, k, v), ref)
                    row["ms"] = harness.device_time_ms(timed, timed_make, b * s * HEADS * HEAD_DIM * 2)
                except Exception as e:  # noqa: BLE001  (a config that does not compile is a result)
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                else:
                    row.update(tflops=tflops(b, s, row["ms"]), vs_cudnn=base_ms / row["ms"])
                rows.append(row)
                print(row, flush=True)
    return rows


def accuracy(args) -> list[dict]:
    """rel L2 against float32 attention, random and FLUX-like inputs, every implementation."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.attention_reference import attention_reference, flux_like_qkv, random_qkv, rel_l2

    out = []
    shape = (1, ACCURACY_SEQ, HEADS, HEAD_DIM)
    for label, make in (("random", random_qkv), ("flux_like", flux_like_qkv)):
        q, k, v = make(jax.random.key(7), shape, jnp.bfloat16)
        ref = attention_reference(q, k, v)
        for variant in args.variants:
            # Block configs compute what their precision's default does; a config that sets `overlap`
            # may not (PV accumulates in place when overlapped, fp8 too), so it is measured.
            opts = VARIANTS[variant].options
            if {"prequantized", "producer"} & set(opts) or ("config" in opts and "overlap" not in opts["config"]):
                continue
            try:
                y = jax.jit(implementation(variant))(q, k, v)
                out.append({"variant": variant, "inputs": label, "seq": ACCURACY_SEQ,
                            "rel_l2": rel_l2(y.astype(jnp.float32), ref)})
            except Exception as e:  # noqa: BLE001  (recorded)
                out.append({"variant": variant, "inputs": label, "error": f"{type(e).__name__}: {e}"[:300]})
            print(out[-1], flush=True)
    producers = [v for v in args.variants if "producer" in VARIANTS[v].options]
    if producers:  # from random projections: against float32 attention on the unfused path's q, k, v
        from pallas_kernels.attention_producer_reference import projections_reference

        text, image, weights, cos, sin = _projection_inputs(1, ACCURACY_SEQ, 7)
        ref = attention_reference(*projections_reference(_streams(text, image, weights), cos, sin, heads=HEADS,
                                                         eps=1e-6))
        for variant in producers:
            try:
                y = jax.jit(producer_implementation(variant))(text, image, weights, cos, sin)
                out.append({"variant": variant, "inputs": "projections", "seq": ACCURACY_SEQ,
                            "rel_l2": rel_l2(y.astype(jnp.float32), ref)})
            except Exception as e:  # noqa: BLE001  (recorded)
                out.append({"variant": variant, "inputs": "projections", "error": f"{type(e).__name__}: {e}"[:300]})
            print(out[-1], flush=True)
    return out


def work_model(args) -> list[dict]:
    """FLUX.1-dev with random bf16 weights (`flux_flax.random_weights.random_transformer`), the
    same noise, text and pooled inputs: one velocity prediction at the first sigma and the final
    latents after `--model-steps` Euler steps, each 8-bit attention implementation against cuDNN
    bf16."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import flux_flax
    from benchmarks.bench_quality import _similarity
    from flux_flax.random_weights import random_transformer
    from flux_flax import sampling

    model = random_transformer(flux_flax.FluxConfig.dev(), dtype=jnp.bfloat16)
    config, size, steps = model.config, args.model_size, args.model_steps
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    h = w = size // 8
    latents = sampling.pack_latents(jax.random.normal(k1, (1, config.in_channels // 4, h, w)))
    txt = jax.random.normal(k2, (1, 512, config.joint_attention_dim), jnp.bfloat16)
    pooled = jax.random.normal(k3, (1, config.pooled_projection_dim), jnp.bfloat16)
    img_ids, txt_ids = jnp.asarray(sampling.latent_image_ids(size, size)), jnp.asarray(sampling.text_ids(512))
    guidance = jnp.full((1,), 3.5)
    sigmas = jnp.asarray(sampling.flux_sigmas(steps, (h // 2) * (w // 2)))

    @nnx.jit
    def velocity(m, lat):
        return m(lat, txt, pooled, jnp.full((1,), sigmas[0]), img_ids, txt_ids, guidance).astype(jnp.float32)

    @nnx.jit
    def sample(m, lat):
        return sampling.denoise(m, lat, txt, pooled, img_ids, txt_ids, sigmas, guidance)

    def run(impl):
        flux_flax.set_attention(model, impl)
        return velocity(model, latents), sample(model, latents)

    base_v, base_x = run(None)  # the exact default: cuDNN on the GPU
    rows = []
    for impl in args.model_impls:
        if time.time() > args.deadline:
            rows.append({"impl": impl, "error": "not run: budget spent"})
            continue
        v, x = run(impl)
        sv, sx = _similarity(base_v, v), _similarity(base_x, x)
        rows.append({"impl": impl, "size": size, "steps": steps, "velocity_cosine": sv["cosine"],
                     "velocity_rel_l2": sv["rel_l2"], "latent_cosine": sx["cosine"], "latent_rel_l2": sx["rel_l2"]})
        print(rows[-1], flush=True)
    return rows


def summarize(rows: list[dict], acc: list[dict]) -> list[dict]:
    ok = {(r["shape"], r["variant"]): r for r in rows if "error" not in r and "ms" in r}
    out = []
    pairs = [(r, ok[(s, PRODUCER_BASELINE)]) for (s, v), r in ok.items()
             if v == "rope_sage8_xla" and r["s"] >= 4608 and (s, PRODUCER_BASELINE) in ok]
    if pairs:
        out.append(harness.figure(
            f"attention with its producer, {VARIANTS['rope_sage8_xla'].doc}",
            f"{harness.span(r['tflops'] for r, _ in pairs)} TFLOP/s",
            shape=f"S = {'/'.join(str(x) for x in sorted({r['s'] for r, _ in pairs}))}, 24x128",
            baseline=VARIANTS[PRODUCER_BASELINE].doc,
            ratio=harness.span((b["ms"] / r["ms"] for r, b in pairs), "{:.2f}") + "x"))
    for variant in ("sage8_int8", "sage8_int8_kernel", "int8", "int8_rot", "int8_kernel", "sage8_fp8", "sage_qk8",
                    "mosaic_bf16"):
        pairs = [(r, ok[(s, BASELINE)]) for (s, v), r in ok.items()
                 if v == variant and r["s"] >= 4608 and (s, BASELINE) in ok]
        if not pairs:
            continue
        errs = [a["rel_l2"] for a in acc if a["variant"] == variant and "rel_l2" in a]
        out.append(harness.figure(
            f"attention, {VARIANTS[variant].doc}", f"{harness.span(r['tflops'] for r, _ in pairs)} TFLOP/s",
            shape=f"S = {'/'.join(str(x) for x in sorted({r['s'] for r, _ in pairs}))}, "
                  f"B = {'/'.join(str(x) for x in sorted({r['b'] for r, _ in pairs}))}, 24x128",
            baseline="cuDNN bf16 flash attention",
            ratio=harness.span((b["ms"] / r["ms"] for r, b in pairs), "{:.2f}") + "x",
            note=f"rel L2 vs fp32 {harness.span(errs, '{:.4f}')}" if errs else ""))
    return out


def markdown(log: dict) -> list[str]:
    rows = log.get("rows", [])
    out = ["# Attention (pallas_kernels/attention.py) vs cuDNN bf16", "",
           f"Device time (CUPTI), median of {log.get('iters', 20)}, rotating input sets (> 2x L2); 24 heads x 128, "
           "non-causal. TFLOP/s = 4 B H S² D / time. Ratios: cuDNN bf16 time / this time (higher is faster). "
           "sage8 rows include quantize_qkv (XLA ops: K mean, int8 codes per query token and per block of block_kv keys (256 by default), "
           "per-channel fp8 V codes, V "
           "transposed); int8 rows the same with int8 codes of V less its mean and their block sums; int8_rot "
           "with q and k rotated first (ConvRot's grouped Hadamard, XLA); *_kernel rows are the kernels alone. "
           f"GPU tests: {log.get('tests', 'not run')}."]
    producer = [v for v in VARIANTS if "producer" in VARIANTS[v].options]
    kernels = [v for v in VARIANTS if v not in producer and any(r["variant"] == v for r in rows)]
    if kernels:
        out += ["", "TFLOP/s:", "", *harness.pivot_table(rows, "tflops", baseline=BASELINE, shape_cols=("b", "s"),
                                                           variants=kernels)]
    us = [{**r, "us": r["ms"] * 1e3} if "ms" in r else r for r in rows if r["variant"] in producer]
    variants = [v for v in producer if any(r["variant"] == v for r in us)]
    if variants:
        out += ["", "With the producer (from the q/k/v projection outputs: QK RMSNorm, RoPE, then the attention), "
                f"device time in us; ratios: {PRODUCER_BASELINE} time / this time:", ""]
        out += harness.pivot_table(us, "us", "{:.1f}", baseline=PRODUCER_BASELINE, shape_cols=("b", "s"),
                                   variants=variants)
    acc = log.get("accuracy", [])
    if acc:
        out += ["", f"Accuracy: relative L2 against float32 attention (XLA), B=1, S={ACCURACY_SEQ}, bf16 inputs:", ""]
        out += harness.md_table(["implementation", "inputs", "rel L2"], [
            (a["variant"], a["inputs"], f"{a['rel_l2']:.4f}" if "rel_l2" in a else a.get("error", ""))
            for a in acc])
    if log.get("sweep"):
        out += ["", "Block configs (rel L2 against cuDNN's output):", ""]
        out += harness.md_table(["B", "S", "config", "TFLOP/s", "vs cuDNN", "rel L2 vs cuDNN"], [
            (r.get("b"), r.get("s"), r.get("config", ""), f"{r['tflops']:.0f}" if "tflops" in r else r.get("error", ""),
             f"{r['vs_cudnn']:.2f}x" if "vs_cudnn" in r else "",
             f"{r['rel_l2_vs_cudnn']:.4f}" if "rel_l2_vs_cudnn" in r else "") for r in log["sweep"]])
    out += _ncu_markdown(log.get("ncu", {}))
    out += _trace_markdown(log.get("trace", []))
    if log.get("model"):
        out += ["", "FLUX.1-dev, random bf16 weights, 8-bit attention vs cuDNN bf16 attention, same inputs "
                "(velocity at the first sigma; final latents after the Euler steps):", ""]
        out += harness.md_table(["implementation", "size", "steps", "velocity cosine", "velocity rel L2",
                                 "final latents cosine", "final latents rel L2"], [
            (m.get("impl"), m.get("size"), m.get("steps"), *(
                [f"{m['velocity_cosine']:.6f}", f"{m['velocity_rel_l2']:.4f}", f"{m['latent_cosine']:.6f}",
                 f"{m['latent_rel_l2']:.4f}"] if "velocity_cosine" in m else [m.get("error", ""), "", "", ""]))
            for m in log["model"]])
    return out


def stage_tests(out_dir, log, args):
    log["tests"] = "; ".join(harness.run_pytest(path, args.tests_k)
                             for path in ("tests/test_attention.py", "tests/test_attention_producer.py"))


def stage_bench(out_dir, log, args):
    got = harness.run_isolated(harness.worker_command(MODULE, "grid", args.argv), timeout=args.variant_timeout,
                               label="grid")
    if "error" in got:
        log["rows"] = harness.error_rows(args.variants, got["error"], shape="all")
    else:
        log.update(got)


_NCU_ROWS = (  # (label, ncu metric) of the counters table; the sm__ / smsp__ ones are asked for by name
    ("duration (us)", "Duration"), ("SM frequency (GHz)", "SM Frequency"),
    ("instructions executed", "smsp__inst_executed.sum"),
    ("issue slots busy (%)", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
    ("eligible warps per scheduler", "Eligible Warps Per Scheduler"),
    ("XU pipe (ex2, conversions) (%)", "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"),
    ("ALU pipe (%)", "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active"),
    ("FMA pipe (%)", "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active"),
    ("registers per thread", "Registers Per Thread"),
    ("warp cycles per issued instruction", "Warp Cycles Per Issued Instruction"))
NCU_PIPE_METRICS = tuple(metric for _, metric in _NCU_ROWS if metric.startswith(("sm__", "smsp__")))
NCU_STALL_METRICS = tuple(f"smsp__average_warps_issue_stalled_{r}_per_issue_active.ratio" for r in (
    "long_scoreboard", "barrier", "wait", "short_scoreboard", "math_pipe_throttle", "mio_throttle", "dispatch_stall",
    "no_instruction", "not_selected", "selected", "branch_resolving", "membar", "sleeping", "lg_throttle", "misc"))


def stage_ncu(out_dir, log, args):
    """Hardware counters of each --ncu-variants kernel (pre-quantized, so only the Mosaic GPU
    kernels match "flash_attention"), in that order, at B=1 S=4608; with the pipe and stall
    metrics, or fewer where this ncu does not know one."""
    code = "\n".join([
        "import jax",
        "from benchmarks.bench_attention import _config, _inputs, _prequantized, implementation, VARIANTS",
        "make = lambda i: _inputs(1, 4608, 500 + i)",
        *[f"jax.block_until_ready(implementation({v!r})(*_prequantized(make, _config(VARIANTS[{v!r}]"
          f".options), precision=VARIANTS[{v!r}].options['precision'])(0), seq=4608))" for v in args.ncu_variants]])
    path = str(out_dir / f"{NAME}_ncu.txt")
    for metrics in (NCU_PIPE_METRICS + NCU_STALL_METRICS, NCU_PIPE_METRICS):
        log["ncu"] = harness.run_ncu(code, "flash_attention", len(args.ncu_variants), path, metrics=metrics,
                                     timeout=args.ncu_timeout)
        if not log["ncu"]["returncode"]:
            break
    with open(path) as f:
        log["ncu"].update(variants=list(args.ncu_variants), kernels=harness.parse_ncu(f.read()))


TRACE_WARM_S = 1.0  # seconds of launches before the profiled one: the SM clock up from idle


def work_trace(args) -> list[dict]:
    """One profiled launch of each --trace-variants kernel (pre-quantized) at each --trace-cells
    cell, right after TRACE_WARM_S of unprofiled launches (both compiled first, so that no
    compile's idle comes between them); its phases summarized. The warm-up is a precaution: the
    int8 trace at B=1 S=4608 read the same (5063 cycles a step against 5064, and ~1.1 cycles per
    globaltimer ns) without it, after a single unprofiled launch (notes/attention.md v16)."""
    import tempfile

    import jax

    from benchmarks import attention_trace

    rows = []
    for variant in args.trace_variants:
        opts = VARIANTS[variant].options
        for cell in args.trace_cells:
            b, s = (int(x) for x in cell.lower().split("x"))
            (qkv,) = _prequantized(lambda i: _inputs(b, s, 700 + i), _config(opts), qk=opts["qk"],
                                   precision=opts["precision"])(0)
            kernel = implementation(variant)
            with tempfile.TemporaryDirectory() as tmp, attention_trace.capture() as got:
                jax.block_until_ready(kernel(qkv, seq=s))
                jax.block_until_ready(kernel(qkv, seq=s, profile_dir=tmp))  # compiled; its trace dropped
                jax.effects_barrier()
                got.clear()
                for f in Path(tmp).iterdir():  # the launch writes to a name fixed when it compiled
                    f.unlink()
                start = time.time()
                while time.time() - start < TRACE_WARM_S:
                    kernel(qkv, seq=s)
                jax.block_until_ready(kernel(qkv, seq=s, profile_dir=tmp))
                jax.effects_barrier()
            if not got:
                rows.append({"variant": variant, "b": b, "s": s, "error": "no profile was written"})
                continue
            rows.append({"variant": variant, "b": b, "s": s, **attention_trace.summarize(got[-1])})
    return rows


def _trace_markdown(rows: list[dict]) -> list[str]:
    from benchmarks import attention_trace

    if not rows:
        return []
    out = ["", "## Inside the kernel (Mosaic GPU's profiler, one launch; `benchmarks/attention_trace.py`)", "",
           "Clock cycles between stamps a warpgroup's first thread stores at its named scopes; ptxas may move "
           "arithmetic across a stamp, so a scope is where the warp was, not the exact cost of its code.", ""]
    for r in rows:
        name = f"{r['variant']}, B={r['b']} S={r['s']}"
        out += [f"### {name}: {r['error']}", ""] if "error" in r else attention_trace.markdown(name, r)
    return out


def _ncu_markdown(ncu: dict) -> list[str]:
    """The counters table of the ncu stage: one column per profiled kernel (its variant); each
    warp state (stall reasons and `selected`) as the warps in it summed over the cycles, per cycle
    that issues: they add up to the resident warps per scheduler over the issuing fraction, the
    warp cycles per issued instruction."""
    kernels = ncu.get("kernels", [])
    names = ncu.get("variants", [])[:len(kernels)]
    if not kernels:
        return []
    stalls = sorted({k for kern in kernels for k in kern if k.startswith("smsp__average_warps_issue_stalled_")},
                    key=lambda k: (-max(kern.get(k, 0) for kern in kernels), k))  # ties by name: a stable table
    fmt = lambda v: f"{int(v):,}" if isinstance(v, float) and v.is_integer() else str(v)
    rows = [(label, *[fmt(kern.get(metric, "")) for kern in kernels]) for label, metric in _NCU_ROWS]
    rows += [(f"stalled: {k.removeprefix('smsp__average_warps_issue_stalled_').removesuffix('_per_issue_active.ratio')}",
              *[fmt(kern.get(k, "")) for kern in kernels]) for k in stalls]
    return ["", f"Nsight Compute, the kernels alone at B=1 S=4608, one launch each ({ncu.get('file', '')}); "
            "stalled rows: warps in that state per issuing cycle (they add up to the warp cycles per issued "
            "instruction):", "",
            *harness.md_table(["counter", *names], rows)]


STAGES = {
    "tests": stage_tests,
    "sweep": harness.worker_stage(MODULE, "sweep"),
    "bench": stage_bench,
    "model": harness.worker_stage(MODULE, "model"),
    "ncu": stage_ncu,
    "trace": harness.worker_stage(MODULE, "trace"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.stage_parser(__doc__, budget_s=200)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seqs", type=int, nargs="+", default=list(SEQS))
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    p.add_argument("--cells", nargs="+", help="BxS cells in this order instead of --batches x --seqs, e.g. 1x4608 4x4608")
    p.add_argument("--model-steps", type=int, default=28)
    p.add_argument("--model-size", type=int, default=1024)
    p.add_argument("--model-impls", nargs="+", default=["sage8", "sage_qk8"])
    p.add_argument("--sweep-precisions", nargs="+", default=list(SWEEP), choices=list(SWEEP))
    p.add_argument("--ncu-timeout", type=float, default=200, help="seconds each Nsight Compute attempt may run")
    p.add_argument("--ncu-variants", nargs="+", default=["int8_kernel", "sage8_int8_kernel"],
                   choices=[v for v, var in VARIANTS.items() if var.options.get("prequantized")])
    p.add_argument("--trace-variants", nargs="+", default=["int8_kernel", "sage8_int8_kernel"],
                   choices=[v for v, var in VARIANTS.items() if var.options.get("prequantized")])
    p.add_argument("--trace-cells", nargs="+", default=["1x4608"], help="BxS cells the trace stage profiles")
    p.add_argument("--update", action="store_true",
                   help="start from the existing results file in --out: the stages run now replace theirs only")
    args = p.parse_args(argv)
    if args.worker:
        args.deadline = args.deadline or time.time() + args.budget_s
        work = {"model": work_model, "sweep": work_sweep, "grid": work_grid, "trace": work_trace}[args.worker]
        harness.emit(work(args))
        return
    previous = args.out / f"{NAME}.json"
    kept = {}
    if args.update and previous.is_file():  # keep the other stages' results (e.g. `--stages model` alone)
        kept = {k: v for k, v in harness.load_results(previous).items()
                if k not in ("bench", "schema", "meta", "device", "summary")}
    harness.run_stage_bench(NAME, MODULE, STAGES, argv, args, markdown,
                            lambda log: summarize(log.get("rows", []), log.get("accuracy", [])), log=kept)


if __name__ == "__main__":
    main()
