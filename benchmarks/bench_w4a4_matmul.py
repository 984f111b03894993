"""W4A4 GEMM: the Pallas Mosaic GPU kernel against XLA's bf16 and int8 GEMMs and the XLA W4A4 layer.

Implementations (x the named FLUX shapes: M in FLUX_TOKEN_COUNTS x the five FLUX (K, N)):
  xla_bf16           XLA bf16 GEMM, x (M, K) @ w (N, K)^T (the baseline)
  xla_int8           XLA int8 GEMM (NT), int32 out
  pallas             pallas_kernels.w4a4_matmul (int8 codes x packed int4 weights, dequantizing epilogue)
  xla_w4a4_layer     convrot_jax.ops.w4a4_linear(implementation="xla"): rotate, quantize, GEMM in XLA ops
  pallas_w4a4_layer  the same with implementation="pallas": rotate-quantize kernel + this GEMM
  pallas_gated_xla   FLUX's residual + gate * (x.w + b), one image: the kernel, then XLA elementwise
  pallas_gated       the same in the kernel's epilogue (`w4a4_matmul(..., gate=, residual=)`)
  pallas_lora32_xla  a rank-32 LoRA's up-projection unfused: pallas, then y + h B^T in XLA (h given)
  pallas_lora32      the same in the kernel's epilogue (`w4a4_matmul(..., lora_h=, lora_up=)`)
                     (the pallas_lora* variants run only when named in --variants)
TOP/s = 2MNK / time; ratios = bf16 time / this time. Device time (CUPTI), median of 20 over
rotating input sets (> 2x the 50 MB L2); each implementation in its own process (benchmarks.harness).

Stages (--stages, comma-separated, default tests,bench):
  tests  `pytest -q tests/test_w4a4_matmul.py` (the gpu-marked FLUX-shape checks) first.
  sweep  candidate tile configs on the large FLUX shapes (each checked against the reference).
  sass   the kernel's SASS (MOSAIC_GPU_DUMP_SASS): GMMA / local-memory / shared-memory op counts.
  ncu    Nsight Compute sections of the default-config kernel on 4608x3072x12288, one launch.
  bench  the implementation x shape table.

    PYTHONPATH=. python3 -m benchmarks.bench_w4a4_matmul [--stages tests,sweep,sass,bench]
    PYTHONPATH=. JAX_PLATFORMS=cpu python3 -m benchmarks.bench_w4a4_matmul --stages bench \\
        --variants xla_bf16 xla_int8 --bench-ms 128 --bench-kn 3072x3072 --out /tmp/w4   # CPU smoke test
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

from benchmarks import harness
from benchmarks.harness import Variant

NAME = "w4a4_matmul"
MODULE = "benchmarks.bench_w4a4_matmul"
BASELINE = "xla_bf16"
VARIANTS = harness.registry(
    Variant("xla_bf16", "XLA bf16 GEMM (NT)"),
    Variant("xla_int8", "XLA int8 GEMM (NT), int32 accumulation"),
    Variant("pallas", "pallas_kernels.w4a4_matmul, the shipped config table"),
    Variant("xla_w4a4_layer", "convrot_jax.ops.w4a4_linear, implementation='xla'", options={"impl": "xla"}),
    Variant("pallas_w4a4_layer", "convrot_jax.ops.w4a4_linear, implementation='pallas'", options={"impl": "pallas"}),
    Variant("pallas_gated_xla", "FLUX's gated residual unfused: pallas, then residual + gate * y in XLA (bf16)"),
    Variant("pallas_gated", "FLUX's gated residual in the pallas epilogue (gate=, residual=)"),
    Variant("pallas_lora32_xla", "a rank-32 LoRA's h B^T unfused: pallas, then y + h B^T in XLA"),
    Variant("pallas_lora32", "a rank-32 LoRA's h B^T in the pallas epilogue (lora_h=, lora_up=)"),
)
LORA_RANK = 32
LARGE_KN = [(3072, 12288), (12288, 3072), (15360, 3072)]
NT = (((1,), (1,)), ((), ()))


def shapes(ms, kns) -> dict[str, dict[str, int]]:
    return {f"M={m} K={k} N={n}": {"m": m, "k": k, "n": n} for (k, n) in kns for m in ms}


def tops(m, n, k, ms) -> float:
    return 2 * m * n * k / (ms * 1e-3) / 1e12


# ------------------------------------------------------------------------------------ inputs
def w4a4_args(m, n, k, scale_group=None):
    import jax
    import jax.numpy as jnp

    from convrot_jax.quant import pack_int4

    def make(i):
        ks = jax.random.split(jax.random.key(1000 + i), 4)
        x = jax.random.randint(ks[0], (m, k), -7, 8, jnp.int8)
        w = pack_int4(jax.random.randint(ks[1], (n, k), -8, 8, jnp.int8))
        sx = jax.random.uniform(ks[2], (m,), jnp.float32, 0.5, 1.5)
        sw_shape = (n,) if scale_group is None else (n, k // scale_group)
        sw = jax.random.uniform(ks[3], sw_shape, jnp.float32, 0.5, 1.5) * 0.01
        return jax.block_until_ready((x, sx, w, sw))
    return make


def _w4a4_args_and(m, n, k, seed: int, *shapes: tuple[int, ...]):
    """`w4a4_args` plus standard normal bf16 arrays of `shapes` (input set i from key seed + i)."""
    import jax
    import jax.numpy as jnp

    base = w4a4_args(m, n, k)

    def make(i):
        ks = jax.random.split(jax.random.key(seed + i), len(shapes))
        return jax.block_until_ready((*base(i), *(jax.random.normal(key, shape, jnp.bfloat16)
                                                  for key, shape in zip(ks, shapes))))
    return make


def gated_args(m, n, k):
    """`w4a4_args` plus a bias, a gate (1, N) and a residual (M, N), bf16 as in FLUX."""
    return _w4a4_args_and(m, n, k, 5000, (n,), (1, n), (m, n))


def lora_args(m, n, k):
    """`w4a4_args` plus a bias and a rank-32 LoRA's h (M, r) and B (N, r), bf16."""
    return _w4a4_args_and(m, n, k, 6000, (n,), (m, LORA_RANK), (n, LORA_RANK))


def bf16_gemm(m, n, k):
    """XLA's bf16 GEMM (NT) at (M, N, K), the baseline of both int4 GEMM benches: (fn, make_args,
    out_bytes) as `harness.device_time_ms` takes them (and a `time_grid` setup returns them)."""
    import jax

    return (lambda a, b: jax.lax.dot_general(a, b, NT)), bf16_gemm_args(m, n, k), m * n * 2


def bf16_gemm_args(m, n, k):
    import jax
    import jax.numpy as jnp

    def make(i):
        ks = jax.random.split(jax.random.key(2000 + i), 2)
        return jax.block_until_ready((jax.random.normal(ks[0], (m, k), jnp.bfloat16),
                                      jax.random.normal(ks[1], (n, k), jnp.bfloat16)))
    return make


def int8_gemm_args(m, n, k):
    import jax
    import jax.numpy as jnp

    def make(i):
        ks = jax.random.split(jax.random.key(3000 + i), 2)
        return jax.block_until_ready((jax.random.randint(ks[0], (m, k), -7, 8, jnp.int8),
                                      jax.random.randint(ks[1], (n, k), -8, 8, jnp.int8)))
    return make


def layer_args(m, n, k):
    import jax
    import jax.numpy as jnp

    from convrot_jax.quant import quantize_weight

    def make(i):
        ks = jax.random.split(jax.random.key(4000 + i), 3)
        x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
        qw = quantize_weight(jax.random.normal(ks[1], (n, k), jnp.float32) * 0.02)
        return jax.block_until_ready((x, qw, jax.random.normal(ks[2], (n,), jnp.bfloat16)))
    return make


def check_close(y, ref) -> float:
    """Max error in units of one bf16 ulp of the reference (<= 1 passes)."""
    import numpy as np

    y64, r64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(y64)):
        return float("inf")
    return float(np.max(np.abs(y64 - r64) / (np.maximum(np.abs(r64), 1e-30) * 2.0**-7)))


# ------------------------------------------------------------------------------------ workers
def work_grid(variant: str, args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    def setup(d):
        m, k, n = d["m"], d["k"], d["n"]
        if variant == "xla_bf16":
            return bf16_gemm(m, n, k)
        if variant == "xla_int8":
            return ((lambda a, b: jax.lax.dot_general(a, b, NT, preferred_element_type=jnp.int32)),
                    int8_gemm_args(m, n, k), m * n * 4)
        if variant == "pallas":
            from pallas_kernels.w4a4_matmul import w4a4_matmul

            return w4a4_matmul, w4a4_args(m, n, k), m * n * 2
        if variant == "pallas_gated_xla":
            from pallas_kernels.w4a4_matmul import w4a4_matmul

            return ((lambda x, sx, w, sw, b, g, r: r + g * w4a4_matmul(x, sx, w, sw, b)), gated_args(m, n, k),
                    m * n * 2)
        if variant == "pallas_gated":
            from pallas_kernels.w4a4_matmul import w4a4_matmul

            return ((lambda x, sx, w, sw, b, g, r: w4a4_matmul(x, sx, w, sw, b, gate=g, residual=r)),
                    gated_args(m, n, k), m * n * 2)
        if variant == "pallas_lora32_xla":
            from pallas_kernels.w4a4_matmul import w4a4_matmul

            def unfused(x, sx, w, sw, b, h, up):
                y = w4a4_matmul(x, sx, w, sw, b).astype(jnp.float32)
                return (y + jax.lax.dot_general(h, up, NT, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)

            return unfused, lora_args(m, n, k), m * n * 2
        if variant == "pallas_lora32":
            from pallas_kernels.w4a4_matmul import w4a4_matmul

            return ((lambda x, sx, w, sw, b, h, up: w4a4_matmul(x, sx, w, sw, b, lora_h=h, lora_up=up)),
                    lora_args(m, n, k), m * n * 2)
        from convrot_jax.ops import w4a4_linear

        impl = VARIANTS[variant].options["impl"]
        return (lambda x, qw, b: w4a4_linear(x, qw, b, implementation=impl)), layer_args(m, n, k), m * n * 2

    def metric(d, ms):
        out = {"tops": tops(d["m"], d["n"], d["k"], ms)}
        if variant == "pallas":
            from pallas_kernels.w4a4_matmul_config import config_for

            out["config"] = dataclasses.asdict(config_for(d["m"], d["n"], d["k"]))
        return out

    return harness.time_grid(shapes(args.bench_ms, args.kns), variant, setup, metric, deadline=args.deadline)


def work_sweep(args) -> list[dict]:
    """Tile configs against the shipped one on the large FLUX shapes (M = 4608 and 512)."""
    import jax

    from pallas_kernels.w4a4_matmul import w4a4_matmul
    from pallas_kernels.w4a4_matmul_config import W4A4MatmulConfig
    from pallas_kernels.w4a4_matmul_reference import w4a4_matmul_reference

    regs = {"weight_operand": "registers"}
    sweep = {  # the shipped registers form against its grid-order and tile variants and the smem form
        4608: [W4A4MatmulConfig(256, 64, 128, 4, **regs), W4A4MatmulConfig(256, 64, 128, 4, grid_tile_width=8, **regs),
               W4A4MatmulConfig(256, 64, 128, 3, **regs), W4A4MatmulConfig(128, 128, 128, 4)],
        512: [W4A4MatmulConfig(128, 64, 128, 4), W4A4MatmulConfig(128, 64, 128, 4, **regs),
              W4A4MatmulConfig(256, 64, 128, 4, **regs)],
    }
    rows = []
    for m, configs in sweep.items():
        for k, n in LARGE_KN + ([(3072, 9216)] if m == 4608 else []):
            bf16_ms = harness.device_time_ms(*bf16_gemm(m, n, k))
            rows.append(dict(m=m, k=k, n=n, impl="xla_bf16", ms=bf16_ms, tops=tops(m, n, k, bf16_ms)))
            make = w4a4_args(m, n, k)
            x, sx, w, sw = make(0)
            ref = w4a4_matmul_reference(x, sx, w, sw)
            for cfg in configs:
                if time.time() > args.deadline:
                    return rows
                fn = functools.partial(w4a4_matmul, config=cfg)
                try:
                    err = check_close(jax.jit(fn)(x, sx, w, sw), ref)
                    ms = harness.device_time_ms(fn, make, out_bytes=m * n * 2)
                except Exception as e:  # noqa: BLE001  (a config that does not compile is a result)
                    rows.append(dict(m=m, k=k, n=n, config=dataclasses.asdict(cfg), error=str(e)[:300]))
                    continue
                rows.append(dict(m=m, k=k, n=n, config=dataclasses.asdict(cfg), ms=ms, tops=tops(m, n, k, ms),
                                 vs_bf16=bf16_ms / ms, err_ulp=err))
                print(f"M={m} K={k} N={n} {cfg}: {tops(m, n, k, ms):.0f} TOP/s ({bf16_ms / ms:.2f}x bf16) "
                      f"err {err:.2f} ulp", flush=True)
    return rows


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
    log["ncu"] = harness.run_ncu(code, "mosaic_gpu", 1, os.path.join(out_dir, "w4a4_matmul_ncu.txt"))


# ------------------------------------------------------------------------------------ results
def summarize(rows: list[dict]) -> list[dict]:
    """README figures: the kernel and the full layer at M >= 4608 (FLUX 1024²) against XLA bf16."""
    ok = {(r["shape"], r["variant"]): r for r in rows if "error" not in r and "ms" in r}
    out = []
    for variant, label in (("pallas", "W4A4 GEMM, Mosaic GPU kernel"),
                           ("pallas_w4a4_layer", "W4A4 layer (rotate-quantize + GEMM kernels)")):
        pairs = [(r, ok[(s, BASELINE)]) for (s, v), r in ok.items()
                 if v == variant and r["m"] >= 4608 and (s, BASELINE) in ok]
        if not pairs:
            continue
        ms_ = sorted({r["m"] for r, _ in pairs})
        out.append(harness.figure(
            label, f"{harness.span(tops(r['m'], r['n'], r['k'], r['ms']) for r, _ in pairs)} TOP/s",
            shape=f"M = {'/'.join(map(str, ms_))}, the {len({(r['k'], r['n']) for r, _ in pairs})} FLUX (K, N)",
            baseline="XLA bf16 GEMM", ratio=harness.span((b["ms"] / r["ms"] for r, b in pairs), "{:.2f}") + "x"))
    return out


def markdown(log: dict) -> list[str]:
    out = ["# W4A4 GEMM (pallas_kernels/w4a4_matmul.py) vs XLA", "",
           f"Device time (CUPTI), median of {log.get('iters', 20)}, rotating input sets (> 2x L2). TOP/s = 2MNK / "
           f"time. Ratios: {BASELINE} time / this time (higher is faster). Layers: convrot_jax.ops.w4a4_linear "
           "(xla: XLA ops; pallas: the rotate-quantize kernel + this GEMM). "
           f"GPU tests: {log.get('tests', 'not run')}.", "", "TOP/s:", ""]
    out += harness.pivot_table(log.get("rows", []), "tops", baseline=BASELINE, shape_cols=("m", "k", "n"),
                               variants=[v for v in VARIANTS if any(r["variant"] == v for r in log.get("rows", []))])
    if log.get("sweep"):
        out += ["", "Tile configs (err in bf16 ulps of the reference; <= 1 passes):", ""]
        out += harness.md_table(["M", "K", "N", "impl / config", "TOP/s", "vs bf16", "err ulp"], [
            (r["m"], r["k"], r["n"], r.get("impl") or r["config"],
             f"{r['tops']:.0f}" if "tops" in r else r.get("error"),
             f"{r['vs_bf16']:.2f}x" if "vs_bf16" in r else "", f"{r['err_ulp']:.2f}" if "err_ulp" in r else "")
            for r in log["sweep"]])
    if log.get("sass"):
        out += ["", f"SASS: {log['sass']}"]
    return out


def stage_tests(out_dir, log, args):
    log["tests"] = harness.run_pytest("tests/test_w4a4_matmul.py", args.tests_k)


def stage_bench(out_dir, log, args):
    log["rows"] = []
    for v in args.variants:
        got = harness.run_isolated(harness.worker_command(MODULE, f"grid:{v}", args.argv),
                                   timeout=args.variant_timeout, label=v)
        log["rows"] += harness.error_rows([v], got["error"], shape="all") if isinstance(got, dict) else got


STAGES = {
    "tests": stage_tests,
    "sweep": harness.worker_stage(MODULE, "sweep"),
    "sass": stage_sass,
    "ncu": stage_ncu,
    "bench": stage_bench,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.stage_parser(__doc__, budget_s=540)
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if not v.startswith("pallas_lora")],
                   choices=list(VARIANTS), help="default: all but the pallas_lora* ones")
    p.add_argument("--bench-kn", default="", help="comma-separated KxN shapes for the bench stage (default all)")
    p.add_argument("--bench-ms", type=int, nargs="*", default=None, help="token counts (default FLUX_TOKEN_COUNTS)")
    args = p.parse_args(argv)
    from pallas_kernels.shapes import FLUX_LINEAR_SHAPES, FLUX_TOKEN_COUNTS

    args.bench_ms = args.bench_ms or list(FLUX_TOKEN_COUNTS)
    args.kns = [kn for kn in FLUX_LINEAR_SHAPES.values()
                if not args.bench_kn or f"{kn[0]}x{kn[1]}" in args.bench_kn.split(",")]
    if args.worker:
        args.deadline = args.deadline or time.time() + args.budget_s
        kind, _, variant = args.worker.partition(":")
        harness.emit(work_sweep(args) if kind == "sweep" else work_grid(variant, args))
        return
    harness.run_stage_bench(NAME, MODULE, STAGES, argv, args, markdown, lambda log: summarize(log.get("rows", [])))


if __name__ == "__main__":
    main()
