"""W4A4 GEMM benchmark on the GPU machine: checks, tile sweep, SASS, and the comparison table.

    PYTHONPATH=. python3 benchmarks/bench_w4a4_matmul.py --out $OUT [--stages tests,sweep,sass,bench]

tests  runs `pytest -q tests/test_w4a4_matmul.py` (the gpu-marked FLUX-shape checks) first.
sweep  times candidate tile configs on the large FLUX shapes (each checked against the reference).
sass   dumps the kernel's SASS (MOSAIC_GPU_DUMP_SASS) and counts its GMMA / local-memory instructions.
ncu    Nsight Compute sections (speed of light, compute, memory, warp stalls) of the default-config
       kernel on 4608x3072x12288, one profiled launch.
bench  this kernel vs XLA bf16 GEMM vs XLA int8 GEMM (NT) vs the naive XLA W4A4 layer
       (convrot_jax.w4a4_linear implementation="xla") for M in FLUX_TOKEN_COUNTS x the five FLUX
       (K, N); and the full layer (rotate-quantize + this GEMM) vs the bf16 GEMM.
Timing: device time of the kernels (CUPTI through jax.experimental.mosaic.gpu.profiler), one
warm-up, median of 20 iterations; each iteration runs the op over several distinct input sets
(rotating buffers, > 2x the 50 MB L2 in all) and the time is divided by their number.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.arg_specs import FLUX_LINEAR_SHAPES, FLUX_TOKEN_COUNTS
from benchmarks.timing import ITERS, device_time_ms
from convrot_jax.quant import pack_int4, quantize_weight
from pallas_kernels.w4a4_matmul import w4a4_matmul
from pallas_kernels.w4a4_matmul_config import W4A4MatmulConfig, config_for
from pallas_kernels.w4a4_matmul_reference import w4a4_matmul_reference

FLUX_KN = list(FLUX_LINEAR_SHAPES.values())
LARGE_KN = [(3072, 12288), (12288, 3072), (15360, 3072)]

# (M, configs) swept on each of the shapes LARGE_KN + (3072, 9216) (M = 4608) or LARGE_KN (M = 512):
# the shipped registers form against its grid-order and tile variants and the smem form.
_REGS = {"weight_operand": "registers"}
SWEEP = {
    4608: [W4A4MatmulConfig(256, 64, 128, 4, **_REGS), W4A4MatmulConfig(256, 64, 128, 4, grid_tile_width=8, **_REGS),
           W4A4MatmulConfig(256, 64, 128, 3, **_REGS), W4A4MatmulConfig(128, 128, 128, 4)],
    512: [W4A4MatmulConfig(128, 64, 128, 4), W4A4MatmulConfig(128, 64, 128, 4, **_REGS),
          W4A4MatmulConfig(256, 64, 128, 4, **_REGS)],
}


def _key(seed: int) -> jax.Array:
    return jax.random.key(seed)


def w4a4_args(m, n, k, scale_group=None):
    def make(i):
        ks = jax.random.split(_key(1000 + i), 4)
        x = jax.random.randint(ks[0], (m, k), -7, 8, jnp.int8)
        w = pack_int4(jax.random.randint(ks[1], (n, k), -8, 8, jnp.int8))
        sx = jax.random.uniform(ks[2], (m,), jnp.float32, 0.5, 1.5)
        sw_shape = (n,) if scale_group is None else (n, k // scale_group)
        sw = jax.random.uniform(ks[3], sw_shape, jnp.float32, 0.5, 1.5) * 0.01
        return jax.block_until_ready((x, sx, w, sw))
    return make


def check_close(y, ref) -> float:
    """Max error in units of one bf16 ulp of the reference (<= 1 passes)."""
    y64, r64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(y64)):
        return float("inf")
    return float(np.max(np.abs(y64 - r64) / (np.maximum(np.abs(r64), 1e-30) * 2.0**-7)))


def tops(m, n, k, ms) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


# --- stages -----------------------------------------------------------------------------------

def stage_tests(out_dir, log, args):
    select = ["-k", args.tests_k] if args.tests_k else []
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_w4a4_matmul.py", *select],
                       capture_output=True, text=True, timeout=420)
    text = r.stdout[-4000:] + r.stderr[-2000:]
    log["tests"] = {"returncode": r.returncode, "tail": text[-1500:]}
    print(text[-1500:], flush=True)


def stage_sweep(out_dir, log, args):
    rows = log["sweep"] = []
    nt = (((1,), (1,)), ((), ()))
    for m, configs in SWEEP.items():
        for k, n in LARGE_KN + ([(3072, 9216)] if m == 4608 else []):
            bf16_ms = device_time_ms(lambda a, b: jax.lax.dot_general(a, b, nt), bf16_gemm_args(m, n, k), m * n * 2)
            rows.append(dict(m=m, k=k, n=n, impl="xla_bf16", ms=bf16_ms, tops=tops(m, n, k, bf16_ms)))
            print(f"M={m} K={k} N={n} XLA bf16: {tops(m, n, k, bf16_ms):.0f} TOP/s", flush=True)
            make = w4a4_args(m, n, k)
            x, sx, w, sw = make(0)
            ref = w4a4_matmul_reference(x, sx, w, sw)
            for cfg in configs:
                fn = functools.partial(w4a4_matmul, config=cfg)
                try:
                    err = check_close(jax.jit(fn)(x, sx, w, sw), ref)
                    ms = device_time_ms(fn, make, out_bytes=m * n * 2)
                except Exception as e:  # noqa: BLE001  (a config that does not compile is a result)
                    rows.append(dict(m=m, k=k, n=n, config=dataclasses.asdict(cfg), error=str(e)[:300]))
                    print(f"M={m} K={k} N={n} {cfg}: ERROR {str(e)[:200]}", flush=True)
                    continue
                rows.append(dict(m=m, k=k, n=n, config=dataclasses.asdict(cfg), ms=ms, tops=tops(m, n, k, ms),
                                 vs_bf16=bf16_ms / ms, err_ulp=err))
                print(f"M={m} K={k} N={n} {cfg}: {ms * 1e3:.1f} us {tops(m, n, k, ms):.0f} TOP/s "
                      f"({bf16_ms / ms:.2f}x bf16) err {err:.2f} ulp", flush=True)
            save_log(out_dir, log)


def stage_sass(out_dir, log, args):
    """Dumps the kernel's PTX and ptxas report (default config, 4608x3072x12288), assembles the
    PTX for sm_90a and counts the SASS instructions that matter (GMMA, local memory, shared
    memory, unpack ALU work)."""
    dump = os.path.join(out_dir, "sass_dump")
    os.makedirs(dump, exist_ok=True)
    code = (
        "import jax, jax.numpy as jnp\n"
        "from benchmarks.bench_w4a4_matmul import w4a4_args\n"
        "from pallas_kernels.w4a4_matmul import w4a4_matmul\n"
        "x, sx, w, sw = w4a4_args(4608, 3072, 12288)(0)\n"
        "jax.block_until_ready(jax.jit(w4a4_matmul)(x, sx, w, sw, jnp.ones(3072)))\n"
    )
    env = dict(os.environ, MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=dump)
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    ptx = sorted(glob.glob(os.path.join(dump, "*.ptx")))
    ptxas_log = "".join(open(f).read() for f in glob.glob(os.path.join(dump, "*.ptxas")))
    entry = log["sass"] = {"ptxas": [ln.strip() for ln in ptxas_log.splitlines() if "Used" in ln or "spill" in ln]}
    tool = lambda name: shutil.which(name) or next(iter(glob.glob(f"/usr/local/cuda*/bin/{name}")), name)  # noqa: E731
    if ptx:
        cubin = os.path.join(dump, "kernel.cubin")
        subprocess.run([tool("ptxas"), "-arch=sm_90a", ptx[0], "-o", cubin], capture_output=True, timeout=120)
        sass = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, timeout=120).stdout
        with open(os.path.join(dump, "kernel.sass"), "w") as f:
            f.write(sass)
        instrs = [ln for ln in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", ln)]
        entry["sass_counts"] = {op: sum(re.search(rf"\b{op}[\s.;]", ln) is not None for ln in instrs) for op in (
            "IGMMA", "HGMMA", "QGMMA", "WARPGROUP.ARRIVE", "WARPGROUP.DEPBAR", "LDL", "STL", "LDSM", "LDS", "STS",
            "STSM", "PRMT", "LOP3", "BAR", "SYNCS")}
        entry["sass_instructions"] = len(instrs)
    print(entry, flush=True)
    with tarfile.open(os.path.join(out_dir, "sass.tar.gz"), "w:gz") as tar:
        tar.add(dump, arcname="sass_dump")
    subprocess.run(["rm", "-rf", dump])


_NCU_SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "WarpStateStats",
                 "Occupancy", "LaunchStats", "SchedulerStats")


def stage_ncu(out_dir, log, args):
    """Hardware counters of the shipped kernel at 4608x3072x12288, one profiled launch (Nsight
    Compute picks it by name). XLA's bf16 GEMM is not profiled: with autotuning on, compilation
    launches candidate cuBLAS kernels under the same names; with it off, XLA picks another kernel."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from benchmarks.bench_w4a4_matmul import w4a4_args\n"
        "from pallas_kernels.w4a4_matmul import w4a4_matmul\n"
        "x, sx, w, sw = w4a4_args(4608, 3072, 12288)(0)\n"
        "jax.block_until_ready(jax.jit(w4a4_matmul)(x, sx, w, sw))\n"
    )
    found = glob.glob("/usr/local/cuda*/bin/ncu") + glob.glob("/opt/nvidia/nsight-compute/*/ncu")
    ncu = shutil.which("ncu") or next(iter(found), "ncu")
    cmd = [ncu, "--clock-control", "none", "--kernel-name", "regex:mosaic_gpu", "--launch-count", "1",
           *[a for s in _NCU_SECTIONS for a in ("--section", s)], sys.executable, "-c", code]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=400)
    text = r.stdout + r.stderr[-3000:]
    with open(os.path.join(out_dir, "w4a4_matmul_ncu.txt"), "w") as f:
        f.write(text)
    log["ncu"] = {"returncode": r.returncode, "file": "w4a4_matmul_ncu.txt"}
    print(text[-12000:], flush=True)


def bf16_gemm_args(m, n, k):
    def make(i):
        ks = jax.random.split(_key(2000 + i), 2)
        return jax.block_until_ready((jax.random.normal(ks[0], (m, k), jnp.bfloat16),
                                      jax.random.normal(ks[1], (n, k), jnp.bfloat16)))
    return make


def stage_bench(out_dir, log, args):
    from convrot_jax.ops import w4a4_linear

    rot_ok = True
    try:
        import pallas_kernels.rotate_quantize  # noqa: F401
    except Exception:  # noqa: BLE001
        rot_ok = False
    rows = log["bench"] = []
    for k, n in FLUX_KN:
        if args.bench_kn and f"{k}x{n}" not in args.bench_kn.split(","):
            continue
        for m in args.bench_ms or FLUX_TOKEN_COUNTS:
            r = dict(m=m, k=k, n=n)

            bf16_args = bf16_gemm_args(m, n, k)

            def int8_args(i):
                ks = jax.random.split(_key(3000 + i), 2)
                return jax.block_until_ready((jax.random.randint(ks[0], (m, k), -7, 8, jnp.int8),
                                              jax.random.randint(ks[1], (n, k), -8, 8, jnp.int8)))

            def layer_args(i):
                ks = jax.random.split(_key(4000 + i), 3)
                x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
                qw = quantize_weight(jax.random.normal(ks[1], (n, k), jnp.float32) * 0.02)
                return jax.block_until_ready((x, qw, jax.random.normal(ks[2], (n,), jnp.bfloat16)))

            nt = (((1,), (1,)), ((), ()))
            r["bf16_ms"] = device_time_ms(lambda a, b: jax.lax.dot_general(a, b, nt), bf16_args, m * n * 2)
            r["int8_ms"] = device_time_ms(
                lambda a, b: jax.lax.dot_general(a, b, nt, preferred_element_type=jnp.int32), int8_args, m * n * 4)
            r["kernel_ms"] = device_time_ms(w4a4_matmul, w4a4_args(m, n, k), m * n * 2)
            r["naive_layer_ms"] = device_time_ms(
                lambda x, qw, b: w4a4_linear(x, qw, b, implementation="xla"), layer_args, m * n * 2)
            if rot_ok:
                try:
                    r["layer_ms"] = device_time_ms(
                        lambda x, qw, b: w4a4_linear(x, qw, b, implementation="pallas"), layer_args, m * n * 2)
                except Exception as e:  # noqa: BLE001
                    rot_ok = False
                    log["rotate_quantize_error"] = str(e)[:500]
            for key in ("bf16", "int8", "kernel", "naive_layer", "layer"):
                if f"{key}_ms" in r:
                    r[f"{key}_tops"] = tops(m, n, k, r[f"{key}_ms"])
                    r[f"{key}_vs_bf16"] = r["bf16_ms"] / r[f"{key}_ms"]
            r["config"] = dataclasses.asdict(config_for(m, n, k))
            rows.append(r)
            save_log(out_dir, log)
            print(f"M={m:5d} K={k:5d} N={n:5d}  bf16 {r['bf16_tops']:5.0f}  int8 {r['int8_tops']:5.0f}  "
                  f"kernel {r['kernel_tops']:5.0f} ({r['kernel_vs_bf16']:.2f}x)  naive {r['naive_layer_vs_bf16']:.2f}x"
                  + (f"  layer {r['layer_vs_bf16']:.2f}x" if "layer_ms" in r else ""), flush=True)
    log["layer_path"] = "ops.w4a4_linear(implementation='pallas'): rotate_quantize + this GEMM" if rot_ok \
        else "not measured: the rotate-quantize kernel failed"
    write_markdown(rows, log, os.path.join(out_dir, "w4a4_matmul.md"))


def write_markdown(rows, log, path):
    dev = jax.devices()[0].device_kind
    lines = [
        "# W4A4 GEMM (pallas_kernels/w4a4_matmul.py) vs XLA, one run",
        "",
        f"Device: {dev}; jax {jax.__version__}. Device time (CUPTI), median of {ITERS}, rotating input sets "
        "(> 2x L2). TOP/s = 2MNK / time. Ratios are bf16 GEMM time / this time (higher is better).",
        f"Full layer: {log.get('layer_path')}.",
        "",
        "| M | K | N | XLA bf16 TOP/s | XLA int8 TOP/s | kernel TOP/s | kernel vs bf16 | naive XLA W4A4 vs bf16 "
        "| full layer vs bf16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        layer = f"{r['layer_vs_bf16']:.2f}x" if "layer_vs_bf16" in r else "n/a"
        lines.append(f"| {r['m']} | {r['k']} | {r['n']} | {r['bf16_tops']:.0f} | {r['int8_tops']:.0f} | "
                     f"{r['kernel_tops']:.0f} | {r['kernel_vs_bf16']:.2f}x | {r['naive_layer_vs_bf16']:.2f}x | {layer} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def save_log(out_dir, log):
    with open(os.path.join(out_dir, "w4a4_matmul.json"), "w") as f:
        json.dump(log, f, indent=1, default=str)


STAGES = {"tests": stage_tests, "sweep": stage_sweep, "sass": stage_sass, "ncu": stage_ncu, "bench": stage_bench}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    p.add_argument("--stages", default="tests,bench")
    p.add_argument("--tests-k", default="", help="pytest -k selection for the tests stage")
    p.add_argument("--bench-kn", default="", help="comma-separated KxN shapes for the bench stage (default all)")
    p.add_argument("--bench-ms", type=int, nargs="*", default=None, help="token counts for the bench stage (default all)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    for name in args.stages.split(","):
        t = time.time()
        print(f"=== {name} ===", flush=True)
        try:
            STAGES[name](args.out, log, args)
        except Exception:  # noqa: BLE001  (keep the other stages' results)
            log[f"{name}_error"] = traceback.format_exc()[-3000:]
            print(log[f"{name}_error"], flush=True)
        log[f"{name}_seconds"] = time.time() - t
        save_log(args.out, log)


if __name__ == "__main__":
    main()
