"""Several GPUs: the whole denoising loop, sequence parallel (one image's tokens over N GPUs) and
data parallel (a batch over N GPUs), W4A4 and bf16, against one GPU in the same run.

Each (precision, mode, devices) group runs in its own process: a random FLUX.1-dev transformer
(W4A4: quantized with the Pallas kernels; both fused), its weights replicated on the first N
devices, and `flux_flax.pipeline.denoise_on_mesh` (what `FluxPipeline` runs) jitted over the
mesh. Sequence parallel samples batch 1 at every --sizes; data parallel samples --data-batch
images at --data-sizes. Reported: seconds per generation (median of --iters after --warmup, host
clock around a synchronised call; --steps steps, --text-tokens T5 tokens, no VAE and no text encoders),
images per second, and the speed-up against the 1-device row of the same precision, mode, size
and batch.

    PYTHONPATH=. python3 -m benchmarks.bench_parallel --devices 1 2 4 --sizes 1024 2048
    PYTHONPATH=. python3 -m benchmarks.bench_parallel --precisions w4a4 --modes sequence --out DIR  # a subset
    PYTHONPATH=. python3 -m benchmarks.bench_parallel --merge A/parallel.json B/parallel.json
    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu PYTHONPATH=. python3 -m \\
        benchmarks.bench_parallel --config tiny --text-tokens 8 --sizes 64 --data-sizes 64 --devices 1 2 4 \\
        --data-batch 4 --steps 2 --iters 1 --warmup 0 --precisions bf16 --out /tmp/par   # CPU smoke test
Writes benchmarks/results/parallel.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

from benchmarks import harness

NAME = "parallel"
MODULE = "benchmarks.bench_parallel"


def groups(args) -> list[str]:
    """"precision:mode:devices" for every combination asked for."""
    return [f"{p}:{m}:{n}" for p in args.precisions for m in args.modes for n in args.devices]


def worker(args, group: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import flux_flax
    from flux_flax import sampling
    from flux_flax.pipeline import denoise_on_mesh, device_mesh

    from flux_flax.random_weights import random_transformer

    precision, mode, devices = group.split(":")
    devices = int(devices)
    config = (flux_flax.FluxConfig.dev() if args.config == "dev"
              else flux_flax.FluxConfig.tiny(num_attention_heads=4))  # 4 heads: they divide over 4 devices
    t0 = time.perf_counter()
    model = random_transformer(config, dtype=jnp.bfloat16)
    if precision == "w4a4":
        flux_flax.quantize_model(model, implementation=args.impl)
    flux_flax.fuse_producers(flux_flax.fuse_projections(model))  # as FluxPipeline.from_pretrained builds it
    mesh = device_mesh(devices, mode)
    graphdef, state = nnx.split(model)
    del model
    state = jax.device_put(state, NamedSharding(mesh, P()))
    jax.block_until_ready(state)
    print(f"{group}: model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    run = jax.jit(functools.partial(denoise_on_mesh, graphdef, mesh, mode), out_shardings=NamedSharding(mesh, P()))
    rows_sharding = NamedSharding(mesh, P("data"))
    sizes, batch = (args.sizes, 1) if mode == "sequence" else (args.data_sizes, args.data_batch)
    rows = []
    for size in sizes:
        img_ids = jnp.asarray(sampling.latent_image_ids(size, size))
        keys = jax.random.split(jax.random.key(0), 3)
        latents = jax.random.normal(keys[0], (batch, len(img_ids), config.in_channels), jnp.float32)
        prompt = jax.random.normal(keys[1], (batch, args.text_tokens, config.joint_attention_dim), jnp.bfloat16)
        pooled = jax.random.normal(keys[2], (batch, config.pooled_projection_dim), jnp.bfloat16)
        guidance = jnp.full((batch,), 3.5, jnp.float32)
        latents, prompt, pooled, guidance = jax.device_put((latents, prompt, pooled, guidance), rows_sharding)
        inputs = (state, latents, prompt, pooled, img_ids, jnp.asarray(sampling.text_ids(args.text_tokens)),
                  jnp.asarray(sampling.flux_sigmas(args.steps, len(img_ids))), guidance)
        t0 = time.perf_counter()
        compiled = run.lower(*inputs).compile()
        compile_s = time.perf_counter() - t0
        ms = harness.wall_ms(lambda: compiled(*inputs), iters=args.iters, warmup=args.warmup,
                             sync=lambda y: y.block_until_ready())
        rows.append(dict(variant=group, precision=precision, mode=mode, devices=devices, size=size, batch=batch,
                         steps=args.steps, text_tokens=args.text_tokens, seconds=ms / 1e3, images_per_s=batch / (ms / 1e3), compile_s=compile_s))
        print(f"  {group} {size}² b{batch}: {ms / 1e3:.2f} s (compile {compile_s:.0f} s)", flush=True)
    return rows


def speedups(rows: list[dict]) -> dict[int, float]:
    """Row index -> its 1-device row's seconds / its seconds (same precision, mode, size, batch)."""
    ok = [r for r in rows if "error" not in r]
    one = {(r["precision"], r["mode"], r["size"], r["batch"]): r["seconds"] for r in ok if r["devices"] == 1}
    return {i: one[key] / r["seconds"] for i, r in enumerate(rows)
            if "error" not in r and (key := (r["precision"], r["mode"], r["size"], r["batch"])) in one}


def markdown(rows: list[dict]) -> list[str]:
    ratio = speedups(rows)
    lines = ["# Several GPUs: sequence and data parallel denoising, FLUX.1-dev", "",
             "The whole denoising loop (no VAE, no text encoders), random weights, text tokens as in the command; "
             "median of the timed runs. Speed-up: the 1-device time of the same precision, mode, size and batch / this time, "
             "same run.", ""]
    body = [[r["precision"], r["mode"], r["devices"], f"{r['size']}²", r["batch"], r["steps"], f"{r['seconds']:.2f}",
             f"{r['images_per_s']:.2f}", f"{ratio[i]:.2f}x" if i in ratio else "-", f"{r['compile_s']:.0f}"]
            for i, r in enumerate(rows) if "error" not in r]
    body += [[r["variant"], f"failed: {r['error']}", *[""] * 8] for r in rows if "error" in r]
    return lines + harness.md_table(
        ["precision", "mode", "GPUs", "size", "batch", "steps", "s per generation", "images/s", "speed-up",
         "compile s"], body, [False, False, True, True, True, True, True, True, True, True])


def summarize(rows: list[dict]) -> list[dict]:
    ratio = speedups(rows)
    return [harness.figure(f"FLUX.1-dev denoising, {r['precision']}, {r['mode']} parallel on {r['devices']} GPUs",
                           f"{r['seconds']:.2f} s per generation ({r['images_per_s']:.2f} images/s)",
                           shape=f"{r['size']}² b{r['batch']}, {r['steps']} steps", baseline="1 GPU",
                           ratio=ratio[i])
            for i, r in enumerate(rows) if i in ratio and r["devices"] > 1]


def write(rows: list[dict], out: Path, meta: dict | None = None, command: str | None = None) -> None:
    harness.write_results(NAME, {"rows": rows}, markdown(rows), out, summary=summarize(rows), meta=meta,
                          command=command)
    print((out / f"{NAME}.md").read_text())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--precisions", nargs="+", choices=("w4a4", "bf16"), default=["w4a4", "bf16"])
    parser.add_argument("--modes", nargs="+", choices=("sequence", "data"), default=["sequence", "data"])
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1024, 2048], help="sequence parallel, batch 1")
    parser.add_argument("--data-sizes", nargs="+", type=int, default=[1024], help="data parallel")
    parser.add_argument("--data-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impl", default="pallas", help="W4A4 implementation (pallas, xla, auto)")
    parser.add_argument("--config", choices=("dev", "tiny"), default="dev", help="tiny: CPU smoke test")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--group-timeout", type=float, default=None, help="seconds each group's process may run")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="PARALLEL_JSON",
                        help="only merge parallel.json files of runs over subsets (same machine) into one table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        harness.emit(worker(args, args.worker))
        return
    command = "python -m " + MODULE + " " + " ".join(argv)
    if args.merge:
        rows, meta = harness.merge_runs(args.merge)
        write(rows, args.out, meta, command=command)
        return
    rows = []
    for group in groups(args):
        got = harness.run_isolated(harness.worker_command(MODULE, group, argv), timeout=args.group_timeout,
                                   label=group)
        rows += harness.error_rows([group], got["error"]) if isinstance(got, dict) else got
    write(rows, args.out, harness.run_meta(probe=True), command=command)


if __name__ == "__main__":
    main()
