"""Benchmark of `convrot-convert` at FLUX.1-dev size: a random 11.9B-parameter bf16 checkpoint in
diffusers layout, sharded as on the Hub (10 GB shards), converted to a W4A4 Orbax checkpoint.
Reports wall time, throughput, peak host RSS (the converter's, from the kernel), the output size,
and the time to load the result, against the targets: output <= 5.5 GiB (>= 4.0x smaller) and
peak RSS <= 4 GiB.

    PYTHONPATH=. python3 -m benchmarks.bench_convert --workdir /tmp/bench [--fraction 0.1]
    PYTHONPATH=. python3 -m benchmarks.bench_convert --workdir /tmp/bench --fraction 0.02 --results /tmp/c  # CPU smoke

`--fraction` keeps that share of the blocks (for a quick run on a small machine; the results say
so). The conversion and the load run in child processes (benchmarks.harness.run_isolated), so that
this process (which only needs shapes, on the CPU) neither skews the memory figure nor takes the GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this process needs shapes only; children get the GPU

from benchmarks import harness  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 1 << 30
TARGET_OUTPUT_BYTES = 5.5 * GIB
TARGET_RATIO = 4.0
TARGET_RSS_BYTES = 4 * GIB
SHARD_BYTES = 10 * 10**9

CONVERT = """
import sys, jax
from benchmarks import harness
from convert.convert import convert_checkpoint
s = convert_checkpoint(sys.argv[1], sys.argv[2], progress=False)
harness.emit({"seconds": s.seconds, "tensors_quantized": s.tensors_quantized, "tensors_kept": s.tensors_kept,
                  "bytes_in": s.bytes_in, "bytes_out": s.bytes_out, "array_bytes": s.array_bytes,
                  "device": jax.devices()[0].device_kind})
"""
LOAD = """
import sys, time, jax
from flax import nnx
from benchmarks import harness
t = time.perf_counter()
from flux_flax.checkpoint import load_checkpoint
model, _ = load_checkpoint(sys.argv[1])
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
harness.emit({"seconds": time.perf_counter() - t})
"""


def _child(code: str, *args: str) -> dict:
    """Runs code in a child process; this process's JAX_PLATFORMS=cpu is not passed on (the GPU,
    if any, is the child's)."""
    got = harness.run_isolated([sys.executable, "-c", code, *args], unset=("JAX_PLATFORMS",), label="convert child",
                               capture=True)
    if "error" in got:
        raise RuntimeError(f"child failed: {got['error']}")
    return got


def run(workdir: Path, fraction: float) -> dict:
    from flux_flax import FluxConfig, abstract_transformer, expected_shapes
    from flux_flax.random_weights import write_random_diffusers_dir

    config = FluxConfig.dev()
    if fraction < 1:
        config = dataclasses.replace(config, num_layers=max(1, round(19 * fraction)),
                                     num_single_layers=max(1, round(38 * fraction)))
    shapes = expected_shapes(abstract_transformer(config))
    src, out = workdir / "transformer", workdir / "flux-w4a4"
    shutil.rmtree(workdir, ignore_errors=True)

    t = time.perf_counter()
    files = write_random_diffusers_dir(src, config, shapes, shard_bytes=SHARD_BYTES)
    generate_s = time.perf_counter() - t
    print(f"generated {len(shapes)} tensors in {len(files)} file(s) in {generate_s:.1f} s", flush=True)

    # Kernel's peak RSS of this process's children: the converter is the first and only one so far.
    convert = _child(CONVERT, str(src), str(out))
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(f"converted: {convert}, peak RSS {peak_rss / GIB:.2f} GiB", flush=True)
    load = _child(LOAD, str(out))

    params = sum(math.prod(s) for s in shapes.values())
    result = {
        "where": f"{convert['device']} host, {os.cpu_count()} CPU cores, {platform.node()}",
        "fraction_of_blocks": fraction,
        "config": {"num_layers": config.num_layers, "num_single_layers": config.num_single_layers},
        "parameters": params,
        "tensors": len(shapes),
        "source_files": len(files),
        "source_bytes": convert["bytes_in"],
        "generate_seconds": generate_s,
        "convert_seconds": convert["seconds"],
        "convert_MB_per_s": convert["bytes_in"] / convert["seconds"] / 1e6,
        "tensors_quantized": convert["tensors_quantized"],
        "tensors_kept": convert["tensors_kept"],
        "peak_rss_bytes": peak_rss,
        "output_bytes": convert["bytes_out"],
        "output_array_bytes_uncompressed": convert["array_bytes"],
        "compression_ratio": convert["bytes_in"] / convert["bytes_out"],
        "load_seconds": load["seconds"],
    }
    result["targets_met"] = {
        # The absolute size target is for the whole model; a fraction is judged by its ratio.
        "output_le_5.5GiB": result["output_bytes"] <= TARGET_OUTPUT_BYTES if fraction >= 1 else None,
        "ratio_ge_4.0": result["compression_ratio"] >= TARGET_RATIO,
        "peak_rss_le_4GiB": peak_rss <= TARGET_RSS_BYTES,
    }
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def markdown(r: dict) -> str:
    gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    ok = lambda b: "n/a" if b is None else "yes" if b else "NO"  # noqa: E731
    t = r["targets_met"]
    fraction = r["fraction_of_blocks"]
    scope = "FLUX.1-dev size" if fraction >= 1 else f"{fraction:.0%} of FLUX.1-dev's blocks"
    return "\n".join([
        f"# convrot-convert: random {scope} checkpoint -> W4A4 Orbax",
        "",
        f"Where: {r['where']}. Source: {r['parameters'] / 1e9:.2f}B parameters, {r['tensors']} bf16 tensors, "
        f"diffusers layout in {r['source_files']} shard(s), written just before (likely still in the page cache).",
        "",
        "| what | figure | target | met |",
        "| --- | --- | --- | --- |",
        f"| source size | {gib(r['source_bytes'])} | | |",
        f"| conversion wall time | {r['convert_seconds']:.1f} s | | |",
        f"| throughput (source bytes / wall) | {r['convert_MB_per_s']:.0f} MB/s | | |",
        f"| peak host RSS (converter) | {gib(r['peak_rss_bytes'])} | <= 4 GiB | {ok(t['peak_rss_le_4GiB'])} |",
        f"| output size | {gib(r['output_bytes'])} | <= 5.5 GiB | {ok(t['output_le_5.5GiB'])} |",
        f"| output arrays before Orbax's zstd | {gib(r['output_array_bytes_uncompressed'])} | | |",
        f"| compression | {r['compression_ratio']:.2f}x | >= 4.0x | {ok(t['ratio_ge_4.0'])} |",
        f"| tensors quantized / kept | {r['tensors_quantized']} / {r['tensors_kept']} | | |",
        f"| load_checkpoint (abstract model + restore to device) | {r['load_seconds']:.1f} s | | |",
        f"| generating the random source | {r['generate_seconds']:.1f} s | | |",
        "",
        "Orbax stores arrays zstd-compressed. Random weights (finite bf16, random signs, mantissas and 8",
        "exponent values) need not compress as trained ones do: the uncompressed array size is the",
        "conservative figure.",
        "",
    ])


def summarize(r: dict) -> list[dict]:
    gib = r["peak_rss_bytes"] / GIB
    scope = "FLUX.1-dev size" if r["fraction_of_blocks"] >= 1 else f"{r['fraction_of_blocks']:.0%} of FLUX.1-dev"
    return [harness.figure(
        "convrot-convert (bf16 safetensors -> W4A4 Orbax)",
        f"peak RSS {gib:.2f} GiB, {r['convert_seconds']:.0f} s, output {r['output_bytes'] / GIB:.2f} GiB",
        shape=f"random {scope} checkpoint, {r['parameters'] / 1e9:.1f}B parameters", baseline="bf16 source size",
        ratio=f"{r['compression_ratio']:.2f}x smaller")]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.argument_parser(__doc__)
    p.add_argument("--workdir", type=Path, required=True, help="scratch directory (removed afterwards)")
    p.add_argument("--fraction", type=float, default=1.0, help="share of FLUX.1-dev's blocks to keep")
    p.add_argument("--results", "--out", type=Path, default=harness.RESULTS, help="where convert.{md,json} go")
    args = p.parse_args(argv)
    result = run(args.workdir, args.fraction)
    meta = harness.run_meta(device=result["where"])
    harness.write_results("convert", result, markdown(result), args.results, summary=summarize(result), meta=meta,
                          command="python -m benchmarks.bench_convert " + " ".join(argv))
    print(markdown(result))


if __name__ == "__main__":
    main()
