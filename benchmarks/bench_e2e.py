"""End-to-end denoising-step latency and memory on the GPU: W4A4 vs bf16, JAX vs PyTorch.

One command measures every variant, each in its own process (clean peak memory, no two
frameworks sharing the GPU):
  torch_eager     diffusers FluxTransformer2DModel, bf16, eager
  torch_compile   the same under torch.compile (default mode)
  jax_bf16        flux_flax, bf16 (attention: cuDNN)
  jax_w4a4_xla    flux_flax + ConvRot W4A4 (flux default policy), XLA reference ops
  jax_w4a4_pallas the same with the Pallas kernels
A step is one transformer forward (FLUX.1-dev config; random weights made on the GPU, or real
ones with --model DIR) at each size and batch, with 512 T5 tokens: median of --iters timed runs
after warm-up. Reported per variant and shape: step ms, ratio to diffusers eager and compiled,
peak GPU memory, transformer weight bytes, compile time. Each JAX variant's step is also broken
down per stage (rotate-quantize, W4A4 GEMM, attention, cuBLAS GEMMs, XLA fusions) from CUPTI's
timings of every kernel of the compiled step.
The JAX variants fuse the projections that read the same input (flux_flax.fuse_projections: q/k/v
per stream, q/k/v + MLP input in single blocks; one quantization pass and one wider GEMM each)
unless --no-fuse; each JAX row records `fused`.

    PYTHONPATH=. python3 -m benchmarks.bench_e2e            # all variants; diffusers must import
Writes benchmarks/results/e2e.{md,json} and e2e.png. Where one command may not run that long
(the lent GPU machine stops a command after 10 minutes), run variant subsets (--variants ... --out
DIR) back to back on the same machine and combine them with --merge DIR1/e2e.json DIR2/e2e.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
VARIANTS = ("torch_eager", "torch_compile", "jax_bf16", "jax_w4a4_xla", "jax_w4a4_pallas")
TEXT_TOKENS = 512
GIB = 2**30


def shapes(sizes: list[int], batches: list[int]) -> list[tuple[int, int]]:
    return [(s, b) for s in sizes for b in batches]


def image_tokens(size: int) -> int:
    return (size // 16) ** 2  # VAE /8, then 2x2 packing


# ------------------------------------------------------------------------------------ PyTorch
def torch_worker(args, variants: list[str]) -> list[dict]:
    import torch
    from diffusers import FluxTransformer2DModel as TorchFlux

    from flux_flax import FluxConfig

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    if args.model:
        model = TorchFlux.from_pretrained(Path(args.model) / "transformer", torch_dtype=torch.bfloat16).to(dev)
        cfg = FluxConfig.from_diffusers_config(dict(model.config))
    else:
        cfg = _config(args)
        with torch.device(dev):
            torch.set_default_dtype(torch.bfloat16)
            model = TorchFlux(patch_size=1, in_channels=cfg.in_channels, num_layers=cfg.num_layers,
                              num_single_layers=cfg.num_single_layers, attention_head_dim=cfg.attention_head_dim,
                              num_attention_heads=cfg.num_attention_heads, joint_attention_dim=cfg.joint_attention_dim,
                              pooled_projection_dim=cfg.pooled_projection_dim, guidance_embeds=cfg.guidance_embeds,
                              axes_dims_rope=tuple(cfg.axes_dims_rope))
            torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"torch: model ready in {time.perf_counter() - t0:.0f} s, {weight_bytes / GIB:.2f} GiB", flush=True)
    rows = []
    for variant in variants:
        fn = torch.compile(model) if variant == "torch_compile" else model
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
                for _ in range(args.warmup):
                    fn(**kw)
                times = []
                for _ in range(args.iters):  # wall clock around a synchronised call, as for JAX
                    sync()
                    t0 = time.perf_counter()
                    fn(**kw)
                    sync()
                    times.append((time.perf_counter() - t0) * 1e3)
            med = statistics.median(times)
            rows.append(dict(variant=variant, size=size, batch=batch, step_ms=med, first_call_s=first,
                             compile_s=max(first - med / 1e3, 0.0),
                             peak_gib=torch.cuda.max_memory_allocated() / GIB if dev == "cuda" else 0.0,
                             weight_gib=weight_bytes / GIB))
            print(f"  {variant} {size}² b{batch}: {med:.1f} ms (first call {first:.1f} s)", flush=True)
    return rows


# ------------------------------------------------------------------------------------ JAX
def jax_worker(args, variant: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import flux_flax

    from benchmarks.models import random_transformer

    impl = {"jax_w4a4_xla": "xla", "jax_w4a4_pallas": "pallas"}.get(variant)
    t0 = time.perf_counter()
    if args.model:
        model = flux_flax.load_transformer(Path(args.model) / "transformer")
    else:
        model = random_transformer(_config(args))
    if impl:
        flux_flax.quantize_model(model, implementation=impl)  # layer by layer: bf16 weights freed as it goes
    if args.fuse:
        flux_flax.fuse_projections(model)
    graphdef, state = nnx.split(model)
    del model
    jax.block_until_ready(state)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"{variant}: model ready in {time.perf_counter() - t0:.0f} s, {weight_bytes / GIB:.2f} GiB", flush=True)
    config = nnx.merge(graphdef, state).config

    @jax.jit
    def step(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    rows = []
    for size, batch in shapes(args.sizes, args.batches):
        s = image_tokens(size)
        k = jax.random.split(jax.random.key(0), 3)
        inputs = dict(
            hidden_states=jax.random.normal(k[0], (batch, s, config.in_channels), jnp.bfloat16),
            encoder_hidden_states=jax.random.normal(k[1], (batch, TEXT_TOKENS, config.joint_attention_dim), jnp.bfloat16),
            pooled_projections=jax.random.normal(k[2], (batch, config.pooled_projection_dim), jnp.bfloat16),
            timestep=jnp.full((batch,), 0.5, jnp.bfloat16), img_ids=jnp.zeros((s, 3)), txt_ids=jnp.zeros((TEXT_TOKENS, 3)),
            guidance=jnp.full((batch,), 3.5, jnp.bfloat16),
        )
        t0 = time.perf_counter()
        compiled = step.lower(state, inputs).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        temp = getattr(mem, "temp_size_in_bytes", 0) or 0
        out_bytes = getattr(mem, "output_size_in_bytes", 0) or 0
        for _ in range(args.warmup):
            compiled(state, inputs).block_until_ready()
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            compiled(state, inputs).block_until_ready()
            times.append((time.perf_counter() - t0) * 1e3)
        med = statistics.median(times)
        row = dict(variant=variant, size=size, batch=batch, step_ms=med, compile_s=compile_s,
                   peak_gib=(weight_bytes + temp + out_bytes + sum(x.nbytes for x in jax.tree.leaves(inputs))) / GIB,
                   weight_gib=weight_bytes / GIB, fused=args.fuse)
        if args.breakdown and jax.default_backend() == "gpu":
            row["breakdown"] = step_breakdown(step, state, inputs)
        rows.append(row)
        print(f"  {variant} {size}² b{batch}: {med:.1f} ms (compile {compile_s:.0f} s)", flush=True)
    stats = jax.devices()[0].memory_stats() or {}
    for row in rows:
        row["process_peak_gib"] = stats.get("peak_bytes_in_use", 0) / GIB
    return rows


# Kernel name -> stage, first match wins (lower-case substrings). Mosaic GPU kernels are the W4A4
# GEMMs (the only Mosaic kernels in the model); cuDNN's fused attention and cuBLAS's GEMMs name
# themselves; everything else XLA emits (norms, modulation, RoPE, GELU, casts) is a fusion.
STAGES = (
    ("rotate_quantize", ("rotate_quantize",)),
    ("w4a4_gemm", ("mosaic", "w4a4", "kernel_body")),
    ("attention", ("cudnn", "fmha", "flash", "attn", "sdpa")),
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
    the step, plus the kernels' sum and the ten longest kernel names (to check the classification).
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
    return {"stages_ms": {k: round(v, 2) for k, v in sorted(stages.items())},
            "kernels_ms": round(sum(stages.values()), 2), "kernel_launches": len(timings),
            "top_kernels": [(n[:80], round(v, 2)) for n, v in top]}


def _config(args):
    from flux_flax import FluxConfig

    return FluxConfig.small() if args.config == "small" else FluxConfig.dev()


# ------------------------------------------------------------------------------------ driver
def run_variant_process(variant_group: str, args) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "benchmarks.bench_e2e", "--worker", variant_group, "--worker-out", out,
           "--sizes", *map(str, args.sizes), "--batches", *map(str, args.batches),
           "--iters", str(args.iters), "--warmup", str(args.warmup), "--variants", *args.variants,
           "--config", args.config]
    if args.model:
        cmd += ["--model", args.model]
    if not args.breakdown:
        cmd += ["--no-breakdown"]
    if not args.fuse:
        cmd += ["--no-fuse"]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    group_variants = [v for v in args.variants if v.startswith("torch")] if variant_group == "torch" else [variant_group]
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.variant_timeout)
    except subprocess.TimeoutExpired:
        print(f"!! {variant_group} stopped after --variant-timeout {args.variant_timeout} s", flush=True)
        return [dict(variant=v, error=f"timeout {args.variant_timeout} s") for v in group_variants]
    if proc.returncode != 0:
        print(f"!! {variant_group} failed with exit code {proc.returncode}", flush=True)
        return [dict(variant=v, error=f"exit {proc.returncode}") for v in group_variants]
    return json.loads(Path(out).read_text())


def write_results(rows: list[dict], device: str, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "e2e.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    ok = [r for r in rows if "error" not in r]
    base = {(r["variant"], r["size"], r["batch"]): r["step_ms"] for r in ok}
    lines = [f"# End-to-end denoising step: FLUX.1-dev transformer ({device})", "",
             "One transformer forward per step, 512 text tokens, random weights unless noted; median of the "
             "timed runs. Ratios: diffusers' step time / this variant's (higher is faster).", "",
             "| variant | size | batch | step ms | vs diffusers eager | vs diffusers compile | peak GiB | weights GiB | compile s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in ok:
        eager = base.get(("torch_eager", r["size"], r["batch"]))
        comp = base.get(("torch_compile", r["size"], r["batch"]))
        ratio = lambda b: f"{b / r['step_ms']:.2f}x" if b else "-"
        lines.append(f"| {r['variant']} | {r['size']}² | {r['batch']} | {r['step_ms']:.1f} | {ratio(eager)} | "
                     f"{ratio(comp)} | {r['peak_gib']:.1f} | {r['weight_gib']:.2f} | {r['compile_s']:.0f} |")
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | | | |")
    with_breakdown = [r for r in ok if "breakdown" in r]
    if with_breakdown:
        names = sorted({k for r in with_breakdown for k in r["breakdown"]["stages_ms"]})
        lines += ["", "Per-stage device time of one step (ms; CUPTI, every kernel of the compiled step; "
                  "`gaps` = step time minus the kernels' sum):", "",
                  "| variant | size | batch | " + " | ".join(names) + " | gaps |",
                  "| --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: |"]
        for r in with_breakdown:
            b = r["breakdown"]
            cells = " | ".join(f"{b['stages_ms'].get(n, 0.0):.1f}" for n in names)
            lines.append(f"| {r['variant']} | {r['size']}² | {r['batch']} | {cells} | {r['step_ms'] - b['kernels_ms']:.1f} |")
    lines.append("\nJAX peak GiB: weights + XLA's temporary buffers + inputs/outputs of the compiled step "
                 "(`compiled.memory_analysis()`); PyTorch: `torch.cuda.max_memory_allocated()`.")
    (out_dir / "e2e.md").write_text("\n".join(lines) + "\n")
    _plot(ok, out_dir)
    print("\n".join(lines))


def _plot(rows: list[dict], out_dir: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = sorted({(r["size"], r["batch"]) for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(variants), 1)
    for i, v in enumerate(variants):
        vals = {(r["size"], r["batch"]): r["step_ms"] for r in rows if r["variant"] == v}
        ax.bar([j + i * width for j in range(len(labels))], [vals.get(l, 0) for l in labels], width, label=v)
    ax.set_xticks([j + 0.4 for j in range(len(labels))], [f"{s}² b{b}" for s, b in labels])
    ax.set_ylabel("ms per denoising step (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "e2e.png", dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--model", help="a diffusers FLUX.1-dev folder with real weights")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false")
    parser.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                        help="JAX: fuse the projections that share an input (flux_flax.fuse_projections)")
    parser.add_argument("--config", choices=["dev", "small"], default="dev", help="small: a CPU smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--variant-timeout", type=float, default=None,
                        help="seconds each variant process may run (a slow compile then costs one row, not the run)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="E2E_JSON",
                        help="only merge e2e.json files of runs over variant subsets (same machine) into one table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torch_variants = [v for v in args.variants if v.startswith("torch")]
        rows = torch_worker(args, torch_variants) if args.worker == "torch" else jax_worker(args, args.worker)
        Path(args.worker_out).write_text(json.dumps(rows))
        return
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        write_results([r for run in runs for r in run["rows"]], runs[0]["device"], args.out)
        return
    rows = []
    if any(v.startswith("torch") for v in args.variants):
        rows += run_variant_process("torch", args)
    for v in args.variants:
        if v.startswith("jax"):
            rows += run_variant_process(v, args)
    import jax
    write_results(rows, jax.devices()[0].device_kind, args.out)


if __name__ == "__main__":
    main()
