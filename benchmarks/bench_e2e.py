"""End-to-end denoising-step latency and memory on the GPU: W4A4 vs bf16, JAX vs PyTorch.

Variants (the registry VARIANTS; each process group runs in its own process: clean peak memory,
no two frameworks sharing the GPU):
  torch_eager      diffusers FluxTransformer2DModel, bf16, eager
  torch_compile    the same under torch.compile (default mode)
  torch_fp8        diffusers + torchao Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
                   + fuse_qkv_projections + torch.compile (the flux-fast recipe without FA3; needs torchao)
  torch_fp8_regional  the same with diffusers' regional compilation (`compile_repeated_blocks`: each
                   block class compiled once; minutes less compile, so it fits one call beside the
                   JAX rows)
  jax_bf16         flux_flax, bf16 (attention: cuDNN)
  jax_w4a4_xla     flux_flax + ConvRot W4A4 (flux default policy), XLA reference ops
  jax_w4a4_pallas  the same with the Pallas kernels, as FluxPipeline builds it: the producers of
                   flux_flax.producers.DEFAULT_KINDS (the GELUs) quantized where they are made
  jax_w4a4_pallas_unfused_producers  the same with no producer fused (every activation written
                   by XLA, then quantized): the W4A4 rows before 2026-12-01 20:30 UTC were this
  jax_w4a4_pallas_no_graphs  jax_w4a4_pallas with XLA's CUDA graphs (command buffers) off
                   (XLA_FLAGS --xla_gpu_enable_command_buffer=): what the graphs save
  jax_w4a4_pallas_producers  jax_w4a4_pallas with the AdaLN LayerNorm+modulate fused as well
  jax_w4a4_pallas_epilogue  jax_w4a4_pallas with FLUX's gated residuals in the W4A4 GEMMs' epilogues
                   (flux_flax.fuse_gated_residuals)
  jax_w4a4_pallas_sage8, jax_bf16_sage8  jax_w4a4_pallas / jax_bf16 with the 8-bit "sage8"
                   attention (its Q/K/V quantized where they are made; flux_flax.set_attention)
  jax_w4a4_pallas_int8, jax_bf16_int8  the same with "int8" attention (q and k rotated, int8 P and V;
                   norm, RoPE and the rotation in the attention producer, qk_producer)
  jax_w4a4_pallas_int8_xla_operands  jax_w4a4_pallas_int8 with qk_producer off: norm, RoPE and the
                   rotation in XLA ops and cuBLAS (the int8 path before 2026-12-04 20:00 UTC)
A step is one transformer forward (FLUX.1-dev config; random weights made on the GPU, or real
ones with --model DIR) at each size and batch, with 512 T5 tokens: median of --iters timed runs
after warm-up (host clock around a synchronised call), and the loop step: --iters calls issued back
to back, one synchronisation after the last (the host's per-call work, ~10 ms for the JAX W4A4
step, hidden behind the device's as in a loop of steps; `harness.back_to_back_ms`). Reported per
variant and shape: both step times, ratios to the baselines of the same run, peak GPU memory, weight bytes, compile time. Each JAX
variant's step is also broken down per stage (rotate-quantize, W4A4 GEMM, attention, cuBLAS
GEMMs, XLA fusions) from CUPTI's timings of every kernel of the compiled step. The JAX variants
fuse the projections that read the same input (flux_flax.fuse_projections) unless --no-fuse.
With --precompute-modulation the JAX step is the one `sampling.denoise` runs: its AdaLN modulation
(`model.modulation`, once per generation there) is computed before the timed call and passed in,
so the step has no modulation layer and no time/text embedding.

    PYTHONPATH=. python3 -m benchmarks.bench_e2e                     # every variant that imports
    PYTHONPATH=. python3 -m benchmarks.bench_e2e --variants jax_bf16 jax_w4a4_pallas --sizes 1024 --batches 1
    PYTHONPATH=. python3 -m benchmarks.bench_e2e --merge A/e2e.json B/e2e.json   # subsets run back to back
    PYTHONPATH=. JAX_PLATFORMS=cpu python3 -m benchmarks.bench_e2e --config small --variants jax_bf16 \\
        jax_w4a4_xla --sizes 64 --batches 1 --iters 1 --warmup 0 --out /tmp/e2e   # CPU smoke test
Writes benchmarks/results/e2e.{md,json} and e2e.png. Where one command may not run that long
(the lent GPU machine stops a command after 10 minutes), run variant subsets (--variants ...
--out DIR) back to back on the same machine and combine them with --merge.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from benchmarks import harness, hlo_sources
from benchmarks.harness import Variant

NAME = "e2e"
MODULE = "benchmarks.bench_e2e"
TEXT_TOKENS = 512
GIB = 2**30
_TORCH = ("torch", "diffusers")
_JAX = ("jax", "flax")
# XLA's default command-buffer types already take fusions, library calls and custom calls (the
# Mosaic GPU kernels) into CUDA graphs; the A/B is therefore against graphs off.
_NO_GRAPHS = "--xla_gpu_enable_command_buffer="
VARIANTS = harness.registry(
    Variant("torch_eager", "diffusers bf16, eager", _TORCH, group="torch", options={"runner": "torch"}),
    Variant("torch_compile", "diffusers bf16, torch.compile", _TORCH, group="torch",
            options={"runner": "torch", "compile": "whole"}),
    Variant("torch_fp8", "diffusers + torchao fp8 dynamic row-wise + fused QKV + torch.compile", (*_TORCH, "torchao"),
            options={"runner": "torch", "compile": "whole", "fp8": True}),
    Variant("torch_fp8_regional", "torch_fp8 with the repeated blocks compiled, not the whole graph",
            (*_TORCH, "torchao"), options={"runner": "torch", "compile": "regional", "fp8": True}),
    Variant("jax_bf16", "flux_flax bf16", _JAX, options={"runner": "jax", "impl": None}),
    Variant("jax_w4a4_xla", "flux_flax W4A4, XLA reference ops", _JAX, options={"runner": "jax", "impl": "xla"}),
    Variant("jax_w4a4_pallas", "flux_flax W4A4, Pallas kernels (GELU producers fused, as FluxPipeline)", _JAX,
            options={"runner": "jax", "impl": "pallas"}),
    Variant("jax_w4a4_pallas_unfused_producers", "flux_flax W4A4, Pallas kernels, no producer fused", _JAX,
            options={"runner": "jax", "impl": "pallas", "producers": ()}),
    Variant("jax_w4a4_pallas_no_graphs", "flux_flax W4A4, Pallas kernels, XLA's CUDA graphs off", _JAX,
            options={"runner": "jax", "impl": "pallas", "xla_flags": _NO_GRAPHS}),
    Variant("jax_w4a4_pallas_epilogue", "flux_flax W4A4, Pallas kernels, gated residuals in the GEMM epilogue", _JAX,
            options={"runner": "jax", "impl": "pallas", "gated_residuals": True}),
    Variant("jax_w4a4_pallas_producers", "flux_flax W4A4, Pallas kernels, producers fused into the quantizer", _JAX,
            options={"runner": "jax", "impl": "pallas", "producers": ("layernorm", "gelu")}),
    Variant("jax_w4a4_pallas_sage8", "flux_flax W4A4, Pallas kernels, GELUs fused, sage8 attention", _JAX,
            options={"runner": "jax", "impl": "pallas", "attention": "sage8"}),
    Variant("jax_bf16_sage8", "flux_flax bf16, sage8 attention", _JAX,
            options={"runner": "jax", "impl": None, "attention": "sage8"}),
    Variant("jax_w4a4_pallas_int8", "flux_flax W4A4, Pallas kernels, GELUs fused, int8 attention", _JAX,
            options={"runner": "jax", "impl": "pallas", "attention": "int8"}),
    Variant("jax_bf16_int8", "flux_flax bf16, int8 attention", _JAX,
            options={"runner": "jax", "impl": None, "attention": "int8"}),
    Variant("jax_w4a4_pallas_int8_xla_operands", "flux_flax W4A4, Pallas kernels, int8 attention, no producer", _JAX,
            options={"runner": "jax", "impl": "pallas", "attention": "int8", "qk_producer": False}),
)
# Ratio columns of the table, and the README's baseline (the first present in the same run).
BASELINES = ("torch_eager", "torch_compile", "torch_fp8", "torch_fp8_regional", "jax_bf16")
README_BASELINES = ("jax_bf16", "torch_compile", "torch_fp8", "torch_fp8_regional")
README_VARIANTS = ("jax_w4a4_pallas",)


def shapes(sizes: list[int], batches: list[int]) -> list[tuple[int, int]]:
    return [(s, b) for s in sizes for b in batches]


def image_tokens(size: int) -> int:
    return (size // 16) ** 2  # VAE /8, then 2x2 packing


# ------------------------------------------------------------------------------------ PyTorch
def torch_worker(args, variants: list[str]) -> list[dict]:
    import torch
    from diffusers import FluxTransformer2DModel as TorchFlux

    from benchmarks.models import quantize_fp8_peer, torch_transformer, torch_weight_bytes
    from flux_flax import FluxConfig

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    if args.model:
        model = TorchFlux.from_pretrained(Path(args.model) / "transformer", torch_dtype=torch.bfloat16).to(dev)
        model.eval().requires_grad_(False)
        cfg = FluxConfig.from_diffusers_config(dict(model.config))
    else:
        cfg = _config(args)
        model = torch_transformer(cfg, dev)  # in eval mode, without gradients
    weight_bytes = torch_weight_bytes(model)
    print(f"torch: model ready in {time.perf_counter() - t0:.0f} s, {weight_bytes / GIB:.2f} GiB", flush=True)
    rows = []
    for variant in variants:
        opts = VARIANTS[variant].options
        if opts.get("fp8"):  # in place: fp8 variants run in their own process (their own group)
            quantize_fp8_peer(model)
            weight_bytes = torch_weight_bytes(model, measured=True)
        if opts.get("compile") == "regional":  # in place: like fp8, its own process
            model.compile_repeated_blocks()
        fn = torch.compile(model) if opts.get("compile") == "whole" else model
        for size, batch in shapes(args.sizes, args.batches):
            s = image_tokens(size)
            g = torch.Generator(dev).manual_seed(0)
            kw = dict(
                hidden_states=torch.randn(batch, s, cfg.in_channels, device=dev, dtype=torch.bfloat16, generator=g),
                encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim, device=dev,
                                                  dtype=torch.bfloat16, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=dev, dtype=torch.bfloat16,
                                               generator=g),
                timestep=torch.full((batch,), 0.5, device=dev, dtype=torch.bfloat16),
                img_ids=torch.zeros(s, 3, device=dev), txt_ids=torch.zeros(TEXT_TOKENS, 3, device=dev),
                guidance=torch.full((batch,), 3.5, device=dev, dtype=torch.bfloat16), return_dict=False,
            )
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                t0 = time.perf_counter()
                fn(**kw)
                sync()
                first = time.perf_counter() - t0
                sync()  # wall clock around a synchronised call, as for JAX
                med, loop = harness.step_times(lambda: fn(**kw), iters=args.iters, warmup=args.warmup,
                                               sync=lambda _: sync())
            rows.append(dict(variant=variant, size=size, batch=batch, step_ms=med, loop_step_ms=loop, first_call_s=first,
                             compile_s=max(first - med / 1e3, 0.0),
                             peak_gib=torch.cuda.max_memory_allocated() / GIB if dev == "cuda" else 0.0,
                             weight_gib=weight_bytes / GIB))
            print(f"  {variant} {size}² b{batch}: {med:.1f} ms, loop {loop:.1f} ms (first call {first:.1f} s)", flush=True)
    return rows


# ------------------------------------------------------------------------------------ JAX
def jax_worker(args, variant: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import flux_flax
    from flux_flax.producers import DEFAULT_KINDS
    from flux_flax.random_weights import random_transformer

    impl = VARIANTS[variant].options["impl"]
    producers = VARIANTS[variant].options.get("producers", DEFAULT_KINDS)
    t0 = time.perf_counter()
    if args.model:
        model = flux_flax.load_transformer(Path(args.model) / "transformer")
    else:
        model = random_transformer(_config(args), dtype=jnp.bfloat16)
    if impl:
        flux_flax.quantize_model(model, implementation=impl)  # layer by layer: bf16 weights freed as it goes
    if args.fuse:
        flux_flax.fuse_projections(model)
    flux_flax.fuse_producers(model, producers)
    flux_flax.set_attention(model, VARIANTS[variant].options.get("attention"),
                            qk_producer=VARIANTS[variant].options.get("qk_producer", True))
    if VARIANTS[variant].options.get("gated_residuals"):
        flux_flax.fuse_gated_residuals(model)
    graphdef, state = nnx.split(model)
    del model
    jax.block_until_ready(state)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"{variant}: model ready in {time.perf_counter() - t0:.0f} s, {weight_bytes / GIB:.2f} GiB", flush=True)
    config = nnx.merge(graphdef, state).config

    @jax.jit
    def step(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    @jax.jit
    def modulation(state, inputs):
        return nnx.merge(graphdef, state).modulation(inputs["timestep"], inputs["pooled_projections"],
                                                     inputs["guidance"])

    rows = []
    for size, batch in shapes(args.sizes, args.batches):
        inputs = step_inputs(config, size, batch)
        if args.precompute_modulation:
            inputs["modulation"] = modulation(state, inputs)
        t0 = time.perf_counter()
        compiled = step.lower(state, inputs).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", 0) or 0
        out_bytes = getattr(mem, "output_size_in_bytes", 0) or 0
        med, loop = harness.step_times(lambda: compiled(state, inputs), iters=args.iters, warmup=args.warmup,
                                       sync=lambda y: y.block_until_ready())
        row = dict(variant=variant, size=size, batch=batch, step_ms=med, loop_step_ms=loop, compile_s=compile_s,
                   peak_gib=(weight_bytes + temp + out_bytes + sum(x.nbytes for x in jax.tree.leaves(inputs))) / GIB,
                   weight_gib=weight_bytes / GIB, fused=args.fuse, precomputed_modulation=args.precompute_modulation)
        if args.breakdown and jax.default_backend() == "gpu":
            row["breakdown"] = step_breakdown(step, state, inputs)
        rows.append(row)
        print(f"  {variant} {size}² b{batch}: {med:.1f} ms, loop {loop:.1f} ms (compile {compile_s:.0f} s)", flush=True)
    stats = jax.devices()[0].memory_stats() or {}
    for row in rows:
        row["process_peak_gib"] = stats.get("peak_bytes_in_use", 0) / GIB
    return rows


def step_inputs(config, size: int, batch: int) -> dict:
    """A FLUX transformer call's keyword arguments at `size`² and `batch` with 512 T5 tokens:
    random bf16 latents and text embeddings, timestep 0.5, guidance 3.5 (no modulation)."""
    import jax
    import jax.numpy as jnp

    s = image_tokens(size)
    k = jax.random.split(jax.random.key(0), 3)
    return dict(
        hidden_states=jax.random.normal(k[0], (batch, s, config.in_channels), jnp.bfloat16),
        encoder_hidden_states=jax.random.normal(k[1], (batch, TEXT_TOKENS, config.joint_attention_dim), jnp.bfloat16),
        pooled_projections=jax.random.normal(k[2], (batch, config.pooled_projection_dim), jnp.bfloat16),
        timestep=jnp.full((batch,), 0.5, jnp.bfloat16), img_ids=jnp.zeros((s, 3)), txt_ids=jnp.zeros((TEXT_TOKENS, 3)),
        guidance=jnp.full((batch,), 3.5, jnp.bfloat16),
    )


# Kernel name -> stage, first match wins (lower-case substrings). Mosaic GPU kernels not named
# otherwise are the W4A4 GEMMs; the attention kernels (flash_attention_*, the exact attention's producer
# attention_producer), cuDNN's fused attention and cuBLAS's GEMMs name themselves; everything
# else XLA emits (norms, modulation, RoPE, GELU, casts) is a fusion.
STAGES = (
    ("rotate_quantize", ("rotate_quantize",)),
    ("lora_down", ("lora_down",)),
    ("attention", ("cudnn", "fmha", "flash", "attn", "sdpa", "attention_producer")),
    ("w4a4_gemm", ("mosaic", "w4a4", "kernel_body")),
    ("cublas_gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas")),
)


def stage_of(kernel_name: str) -> str:
    name = kernel_name.lower()
    for stage, keys in STAGES:
        if any(k in name for k in keys):
            return stage
    return "xla_fusions"


def step_breakdown(step, state, inputs) -> dict:
    """Device time of one step per stage (ms), from CUPTI's per-kernel timings of every kernel of
    the step, plus the kernels' sum, the launches per stage, the XLA fusions' time per source line
    of the model (`benchmarks.hlo_sources`) and the ten longest kernel names (to check the
    classification).
    CUPTI does not see kernels replayed from CUDA graphs, so the step is compiled once more with
    XLA's command buffers off for this measurement; the step time itself is the graph-on one."""
    from jax.experimental.mosaic.gpu import profiler

    compiled = step.lower(state, inputs).compile(compiler_options={"xla_gpu_enable_command_buffer": ""})
    _, timings = profiler.measure(compiled, aggregate=False)(state, inputs)
    if not timings:
        raise RuntimeError("CUPTI returned no kernel timings for the step")
    per_name: dict[str, float] = {}
    for name, ms in timings:
        per_name[name] = per_name.get(name, 0.0) + ms
    stages: dict[str, float] = {}
    for name, ms in per_name.items():
        stage = stage_of(name)
        stages[stage] = stages.get(stage, 0.0) + ms
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:10]
    launches: dict[str, int] = {}
    for name, _ in timings:
        launches[stage_of(name)] = launches.get(stage_of(name), 0) + 1
    xla = [(name, ms) for name, ms in timings if stage_of(name) == "xla_fusions"]
    by_source = hlo_sources.time_by_source(xla, hlo_sources.instruction_sources(compiled.as_text()))
    return {"stages_ms": {k: round(v, 2) for k, v in sorted(stages.items())},
            "kernels_ms": round(sum(stages.values()), 2), "kernel_launches": len(timings),
            "launches_per_stage": dict(sorted(launches.items())),
            "xla_fusions_by_source": [(where, round(ms, 3), n) for where, (ms, n) in by_source.items()],
            "top_kernels": [(n[:80], round(v, 2)) for n, v in top]}


def breakdown_lines(label: str, step_ms: float, b: dict) -> list[str]:
    """Markdown of a `step_breakdown` `b` of the step `label` whose host-timed step took `step_ms`:
    device time and launches per stage, the gaps, the XLA fusions by model source line."""
    stages = list(b["stages_ms"])
    lines = ["", f"Per-stage device time with {label} (ms; CUPTI; {b['kernel_launches']} launches; gaps = step time "
             f"minus the kernels' sum = {step_ms - b['kernels_ms']:.1f} ms, mostly the host's work of a synchronised call, "
             f"not device idle: `benchmarks/step_trace.py`):", ""]
    lines += harness.md_table(["", *stages], [["ms", *(f"{b['stages_ms'][k]:.2f}" for k in stages)],
                                              ["launches", *(b["launches_per_stage"].get(k, 0) for k in stages)]],
                              [False] + [True] * len(stages))
    lines += ["", "XLA fusions by the model source line they come from (the 12 longest):", ""]
    lines += harness.md_table(["source", "ms", "launches"],
                              [[f"`{w}`", f"{ms:.2f}", n] for w, ms, n in b["xla_fusions_by_source"][:12]],
                              [False, True, True])
    return lines


def _config(args):
    from flux_flax import FluxConfig

    return {"dev": FluxConfig.dev, "small": FluxConfig.small, "tiny": FluxConfig.tiny}[args.config]()


# ------------------------------------------------------------------------------------ results
def _shape(r) -> str:
    return f"{r['size']}² b{r['batch']}"


def summarize(rows: list[dict]) -> list[dict]:
    ok = [r for r in rows if "error" not in r and "step_ms" in r]
    by = {(r["variant"], r["size"], r["batch"]): r for r in ok}
    out = []
    for r in ok:
        if r["variant"] not in README_VARIANTS:
            continue
        base = next((b for b in README_BASELINES if (b, r["size"], r["batch"]) in by), None)
        b = by.get((base, r["size"], r["batch"]))
        key = harness.compared_step_key(r, b)
        kind = "per loop step" if key == "loop_step_ms" else "per step"
        figure = f"{r[key]:.1f} ms {kind}, weights {r['weight_gib']:.2f} GiB"
        if b:
            figure += f" (baseline {b[key]:.1f} ms, {b['weight_gib']:.2f} GiB)"
        if key == "loop_step_ms":
            figure += f"; synchronised call {r['step_ms']:.1f} ms" + (f" (baseline {b['step_ms']:.1f})" if b else "")
        out.append(harness.figure(f"FLUX.1-dev step, {VARIANTS[r['variant']].doc}", figure, shape=_shape(r),
                                  baseline=base and VARIANTS[base].doc,
                                  ratio=b[key] / r[key] if b else None))
    return out


def markdown(rows: list[dict], runs: int = 1) -> list[str]:
    """The results page; `runs` > 1: rows merged from that many runs (`--merge`)."""
    ok = [r for r in rows if "error" not in r]
    by = {(r["variant"], r["size"], r["batch"]): r for r in ok}
    bases = [b for b in BASELINES if any(r["variant"] == b for r in ok)]
    lines = ["# End-to-end denoising step: FLUX.1-dev transformer", "",
             "One transformer forward per step, 512 text tokens, random weights unless noted; median of the timed "
             "runs. step ms: host clock around one synchronised call; loop ms: per call of --iters calls issued "
             "back to back with one synchronisation (the host's per-call work overlapped with the device's, as "
             "in a loop of steps). Ratios: the baseline's time / this variant's, same run (higher is faster)."
             + (f" Merged from {runs} runs over variant subsets (`--merge`; the runs' commands: their own results "
                "files): a ratio between rows of two runs compares processes of two calls on the same kind of "
                "machine." if runs > 1 else ""), ""]

    def ratio(r, b, key):
        base = by.get((b, r["size"], r["batch"]), {})
        return f"{base[key] / r[key]:.2f}x" if key in base and key in r else "-"

    body = []
    for r in ok:
        loop = f"{r['loop_step_ms']:.1f}" if "loop_step_ms" in r else "-"
        body.append([r["variant"], f"{r['size']}²", r["batch"], f"{r['step_ms']:.1f}", *(ratio(r, b, "step_ms") for b in bases),
                     loop, *(ratio(r, b, "loop_step_ms") for b in bases), f"{r['peak_gib']:.1f}",
                     f"{r['weight_gib']:.2f}", f"{r['compile_s']:.0f}"])
    body += [[r["variant"], f"failed: {r['error']}", *[""] * (6 + 2 * len(bases))] for r in rows if "error" in r]
    lines += harness.md_table(["variant", "size", "batch", "step ms", *(f"vs {b}" for b in bases), "loop ms",
                               *(f"loop vs {b}" for b in bases), "peak GiB", "weights GiB", "compile s"], body,
                              [False, True, True, True, *[True] * len(bases), True, *[True] * len(bases),
                               True, True, True])
    with_breakdown = [r for r in ok if "breakdown" in r]
    if with_breakdown:
        names = sorted({k for r in with_breakdown for k in r["breakdown"]["stages_ms"]})
        lines += ["", "Per-stage device time of one step (ms; CUPTI, every kernel of the compiled step; "
                  "`gaps` = step time minus the kernels' sum, mostly the host's work of a synchronised call, not device "
                  "idle: `benchmarks/step_trace.py`):", ""]
        lines += harness.md_table(
            ["variant", "size", "batch", *names, "gaps", "launches"],
            [[r["variant"], f"{r['size']}²", r["batch"],
              *(f"{r['breakdown']['stages_ms'].get(n, 0.0):.1f}" for n in names),
              f"{r['step_ms'] - r['breakdown']['kernels_ms']:.1f}", r["breakdown"]["kernel_launches"]]
             for r in with_breakdown],
            [False] + [True] * (len(names) + 4))
        for r in with_breakdown:
            sources = r["breakdown"].get("xla_fusions_by_source")
            if sources:
                lines += ["", f"XLA fusions of {r['variant']} at {_shape(r)} by the model source line they come "
                          f"from (the {min(len(sources), 15)} longest of {len(sources)}):", ""]
                lines += harness.md_table(["source", "ms", "launches"],
                                          [[f"`{where}`", f"{ms:.2f}", n] for where, ms, n in sources[:15]],
                                          [False, True, True])
    lines.append("\nJAX peak GiB: weights + XLA's temporary buffers + inputs/outputs of the compiled step "
                 "(`compiled.memory_analysis()`); PyTorch: `torch.cuda.max_memory_allocated()`.")
    return lines


def write(rows: list[dict], out: Path, meta: dict | None = None, command: str | None = None, runs: int = 1) -> None:
    ok = [r for r in rows if "error" not in r]
    groups = sorted({(r["size"], r["batch"]) for r in ok})
    variants = list(dict.fromkeys(r["variant"] for r in ok))
    by = {(r["variant"], r["size"], r["batch"]): r["step_ms"] for r in ok}

    def plot(path):
        harness.bar_plot(path, [f"{s}² b{b}" for s, b in groups],
                         {v: [by.get((v, s, b), 0.0) for s, b in groups] for v in variants},
                         "ms per denoising step (lower is better)")

    harness.write_results(NAME, {"rows": rows}, markdown(rows, runs), out, summary=summarize(rows), meta=meta,
                          plot=plot if ok else None, command=command)
    print((out / f"{NAME}.md").read_text())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--variants", "--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", help="a diffusers FLUX.1-dev folder with real weights")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="JAX: fuse the projections that share an input (flux_flax.fuse_projections)")
    parser.add_argument("--precompute-modulation", action="store_true",
                        help="JAX: time the step given its AdaLN modulation, as sampling.denoise runs it")
    parser.add_argument("--config", choices=["dev", "small", "tiny"], default="dev",
                        help="small / tiny: CPU smoke tests")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--variant-timeout", type=float, default=None,
                        help="seconds each variant process may run (a slow compile then costs one row, not the run)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="E2E_JSON",
                        help="only merge e2e.json files of runs over variant subsets (same machine) into one table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        harness.emit(work(args, args.worker))
        return
    if args.merge:
        rows, meta = harness.merge_runs(args.merge)
        write(rows, args.out, meta, command="python -m " + MODULE + " " + " ".join(argv), runs=len(args.merge))
        return
    rows, meta = [], harness.run_meta(probe=True)
    for group, names in harness.process_groups(VARIANTS, args.variants).items():
        flags = VARIANTS[names[0]].options.get("xla_flags")
        env = {"XLA_FLAGS": " ".join(filter(None, (os.environ.get("XLA_FLAGS"), flags)))} if flags else None
        got = harness.run_isolated(harness.worker_command(MODULE, group, argv), timeout=args.variant_timeout,
                                   label=group, env=env)
        rows += harness.error_rows(names, got["error"]) if isinstance(got, dict) else got
        # After every group, so that a run stopped from outside keeps the groups it finished.
        write(rows, args.out, meta, command="python -m " + MODULE + " " + " ".join(argv))


def work(args, group: str) -> list[dict]:
    """One process group's rows; a variant whose imports are missing gets an error row."""
    names = harness.process_groups(VARIANTS, args.variants)[group]
    rows, runnable = [], []
    for name in names:
        try:
            harness.check_requires(VARIANTS[name])
            runnable.append(name)
        except harness.MissingDependency as e:
            print(f"!! {e}", flush=True)
            rows += harness.error_rows([name], str(e))
    if not runnable:
        return rows
    if VARIANTS[runnable[0]].options["runner"] == "torch":
        return rows + torch_worker(args, runnable)
    return rows + [r for name in runnable for r in jax_worker(args, name)]


if __name__ == "__main__":
    main()
