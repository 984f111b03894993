"""W4A16 GEMM: the Pallas Mosaic GPU kernel against XLA's bf16 GEMM and the XLA W4A16 layer.

Implementations (x the FLUX modulation shapes, K = 3072 -> N = 6/3/2 x 3072 at M in MODULATION_MS,
and the T5-XXL shapes at M = 512):
  xla_bf16            XLA bf16 GEMM, x (M, K) @ w (N, K)^T (the baseline: the layer unquantized)
  pallas              pallas_kernels.w4a16_matmul (bf16 x, packed int4 weights and their scales)
  xla_w4a16_layer     convrot_jax.ops.w4a16_linear(implementation="xla"): rotate x, dequantize the
                      whole weight to bf16 in XLA, dot
  pallas_w4a16_layer  the same with implementation="pallas": rotate x (XLA), this kernel
Weight GB/s = the bytes of the weight the variant reads (bf16: 2NK; int4: NK/2 + 4N scales) /
time; ratios = bf16 time / this time. Device time (CUPTI), median of 20 over rotating input sets
(> 2x the 50 MB L2); the baseline runs in its own process, the int4 variants share one.

Stages (--stages, comma-separated, default tests,bench):
  tests  `pytest -q -m gpu tests/test_w4a16_matmul.py` first.
  sweep  candidate tile configs on a few shapes (each checked against the reference), with the
         device time of the call's XLA ops beside the kernel (one input set, L2-warm).
  bench  the implementation x shape table.
  quick  (run as `--worker quick`, in this process) for short GPU slots: QUICK_SHAPES in priority
         order, the bf16 GEMM and the checked kernel per shape, rows printed as they complete.
  probe  (`--worker probe`) each kernel of the call at M = 28 / 64 / 4 / 112 / 512, the W4A16
         layer's kernels at M = 4 and 64, and x's K permutation in its two forms.

    PYTHONPATH=. python3 -m benchmarks.bench_w4a16_matmul [--stages tests,sweep,bench]
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.bench_w4a4_matmul import bf16_gemm
from benchmarks.harness import Variant

NAME = "w4a16_matmul"
MODULE = "benchmarks.bench_w4a16_matmul"
BASELINE = "xla_bf16"
VARIANTS = harness.registry(
    Variant("xla_bf16", "XLA bf16 GEMM (NT)"),
    Variant("pallas", "pallas_kernels.w4a16_matmul, default config", group="w4a16"),
    Variant("xla_w4a16_layer", "convrot_jax.ops.w4a16_linear, implementation='xla'", group="w4a16",
            options={"impl": "xla"}),
    Variant("pallas_w4a16_layer", "convrot_jax.ops.w4a16_linear, implementation='pallas'", group="w4a16",
            options={"impl": "pallas"}),
)
MODULATION_K = 3072
MODULATION_N = (6 * 3072, 3 * 3072, 2 * 3072)  # double blocks' norm1 / norm1_context, single blocks, norm_out
MODULATION_MS = (1, 4, 28, 64, 112)  # batch, and steps x batch when sampling precomputes every step
T5_KN = ((4096, 4096), (4096, 10240), (10240, 4096))
T5_M = 512


def shapes() -> dict[str, dict[str, int]]:
    out = {f"M={m} K={MODULATION_K} N={n}": {"m": m, "k": MODULATION_K, "n": n} for n in MODULATION_N
           for m in MODULATION_MS}
    out.update({f"M={T5_M} K={k} N={n}": {"m": T5_M, "k": k, "n": n} for k, n in T5_KN})
    return out


def weight_bytes(variant: str, n: int, k: int) -> int:
    return 2 * n * k if variant == BASELINE else n * k // 2 + 4 * n


# ------------------------------------------------------------------------------------ inputs
def kernel_args(m, n, k):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.rounding import pack_int4

    def make(i):
        ks = jax.random.split(jax.random.key(1000 + i), 4)
        x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
        w = pack_int4(jax.random.randint(ks[1], (n, k), -7, 8, jnp.int8))
        sw = jax.random.uniform(ks[2], (n,), jnp.float32, 0.5, 1.5) * 0.01
        return jax.block_until_ready((x, w, sw, jax.random.normal(ks[3], (n,), jnp.bfloat16)))
    return make


def layer_args(m, n, k):
    import jax
    import jax.numpy as jnp

    from convrot_jax.quant import QuantizedWeight
    from pallas_kernels.rounding import pack_int4

    def make(i):  # a quantized weight as quantize_weight makes it, without its rotation's cost
        ks = jax.random.split(jax.random.key(4000 + i), 4)
        x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
        qw = QuantizedWeight(pack_int4(jax.random.randint(ks[1], (n, k), -7, 8, jnp.int8)),
                             jax.random.uniform(ks[2], (n,), jnp.float32, 0.5, 1.5) * 0.01)
        return jax.block_until_ready((x, qw, jax.random.normal(ks[3], (n,), jnp.bfloat16)))
    return make


def err_ulp(y, ref) -> float:
    """Max error in bf16 ulps of the reference (<= 1 passes: the kernel and the float32
    reference differ by summation order and one rounding)."""
    import numpy as np

    y64, r64 = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(y64)):
        return float("inf")
    return float(np.max(np.abs(y64 - r64) / (np.maximum(np.abs(r64), 1e-3) * 2.0**-7)))


def xla_extra_us(fn, args) -> float:
    """Device time (us) of the call's kernels other than the Mosaic GPU one (the x permute and
    pad, the finish of shared tiles, the transpose): one input set, mean of 5 calls."""
    import jax
    from jax.experimental.mosaic.gpu import profiler

    _, runs = profiler.measure(jax.jit(fn), aggregate=False, iterations=5)(*args)
    if not runs:
        return float("nan")
    return 1e3 * sum(ms for run in runs for name, ms in run if "mosaic" not in name.lower()) / len(runs)


def kernel_error(fn, m, n, k) -> float:
    import jax
    import jax.numpy as jnp

    from pallas_kernels.w4a16_matmul_reference import w4a16_matmul_reference

    x, w, sw, b = kernel_args(m, n, k)(0)
    return err_ulp(jax.jit(fn)(x, w, sw, b), w4a16_matmul_reference(x, w, sw, b, out_dtype=jnp.float32))


# ------------------------------------------------------------------------------------ workers
def work_grid(variant: str, args) -> list[dict]:
    def setup(d):
        m, k, n = d["m"], d["k"], d["n"]
        if variant == "xla_bf16":
            return bf16_gemm(m, n, k)
        if variant == "pallas":
            from pallas_kernels.w4a16_matmul import w4a16_matmul

            return w4a16_matmul, kernel_args(m, n, k), m * n * 2
        from convrot_jax.ops import w4a16_linear

        impl = VARIANTS[variant].options["impl"]
        return (lambda x, qw, b: w4a16_linear(x, qw, b, implementation=impl)), layer_args(m, n, k), m * n * 2

    def metric(d, ms):
        out = {"weight_gbs": weight_bytes(variant, d["n"], d["k"]) / (ms * 1e-3) / 1e9}
        if variant == "pallas":
            from pallas_kernels.w4a16_matmul import w4a16_matmul
            from pallas_kernels.w4a16_matmul_config import config_for

            out["config"] = dataclasses.asdict(config_for(d["m"], d["n"], d["k"]))
            out["err_ulp"] = kernel_error(w4a16_matmul, d["m"], d["n"], d["k"])
        return out

    return harness.time_grid(shapes(), variant, setup, metric, deadline=args.deadline)


def work_group(names: list[str], args) -> list[dict]:
    rows = []
    for v in names:
        rows += work_grid(v, args)
    return rows


def work_sweep(args) -> list[dict]:
    """Tile configs against the default one on a few shapes, each checked against the reference."""
    from pallas_kernels.w4a16_matmul import w4a16_matmul
    from pallas_kernels.w4a16_matmul_config import config_for

    def variants(m, n, k, **changes):
        return [dataclasses.replace(config_for(m, n, k), **c) for c in changes.values()]

    sweep = {  # (m, k, n) -> configs besides the default
        (1, 3072, 18432): variants(1, 18432, 3072, b=dict(tile_k=128),
                                   c=dict(tile_k=512, max_concurrent_steps=5), d=dict(max_concurrent_steps=4)),
        (28, 3072, 9216): variants(28, 9216, 3072, b=dict(tile_k=128)),
        (64, 3072, 6144): variants(64, 6144, 3072, b=dict(tile_k=128, max_concurrent_steps=6),
                                   c=dict(tile_n=128, tile_k=128, max_concurrent_steps=4)),
        (512, 4096, 10240): variants(512, 10240, 4096, b=dict(tile_m=64, tile_k=256, max_concurrent_steps=4),
                                     c=dict(tile_k=64, max_concurrent_steps=6)),
    }
    rows = []
    for (m, k, n), configs in sweep.items():
        bf16_ms = harness.device_time_ms(*bf16_gemm(m, n, k))
        rows.append(dict(m=m, k=k, n=n, impl="xla_bf16", ms=bf16_ms))
        for cfg in [config_for(m, n, k), *configs]:
            if time.time() > args.deadline:
                return rows
            fn = functools.partial(w4a16_matmul, config=cfg)
            try:
                err = kernel_error(fn, m, n, k)
                ms = harness.device_time_ms(fn, kernel_args(m, n, k), m * n * 2)
                extra = xla_extra_us(fn, kernel_args(m, n, k)(0))
            except Exception as e:  # noqa: BLE001  (a config that does not compile is a result)
                rows.append(dict(m=m, k=k, n=n, config=dataclasses.asdict(cfg), error=str(e)[:300]))
                continue
            rows.append(dict(m=m, k=k, n=n, config=dataclasses.asdict(cfg), ms=ms, vs_bf16=bf16_ms / ms,
                             weight_gbs=weight_bytes("pallas", n, k) / (ms * 1e-3) / 1e9, err_ulp=err, xla_us=extra))
            print(f"  sweep {m}x{k}x{n} {cfg}: {ms * 1e3:.1f} us ({extra:.1f} us XLA ops), {bf16_ms / ms:.2f}x bf16, "
                  f"err {err:.2f} ulp", flush=True)
    return rows


QUICK_SHAPES = ((4, 3072, 18432), (28, 3072, 18432), (64, 3072, 18432), (112, 3072, 18432), (4, 3072, 9216),
                (4, 3072, 6144), (1, 3072, 18432), (64, 3072, 9216), (512, 4096, 10240))
QUICK_LAYER_MS = (4, 28, 64)  # the rows (N = 18432) that also time the two W4A16 layers


def kernel_check(y, x, w, sw, b, scale_group=None) -> float:
    """max |y - ref| / tol over the output (<= 1 passes): the tests' derived bound (summation
    order, 2 (K + 2) float32 ulps of the sum of |terms|, and one bf16 rounding each side)."""
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.rounding import pack_int4, unpack_int4
    from pallas_kernels.w4a16_matmul_reference import w4a16_matmul_reference

    k = x.shape[1]
    ref = np.asarray(w4a16_matmul_reference(x, w, sw, b, scale_group=scale_group, out_dtype=jnp.float32), np.float64)
    terms = np.asarray(w4a16_matmul_reference(jnp.abs(x), pack_int4(jnp.abs(unpack_int4(w))), sw, jnp.abs(b),
                                              scale_group=scale_group, out_dtype=jnp.float32), np.float64)
    y64 = np.asarray(y, np.float64)
    tol = 2.0**-8 * (np.abs(ref) + np.abs(y64)) + 2 * (k + 2) * 2.0**-24 * terms
    return float(np.max(np.abs(y64 - ref) / tol)) if np.all(np.isfinite(y64)) else float("inf")


def work_quick(args) -> list[dict]:
    """For short GPU slots: one process, shapes in priority order, per shape the bf16 GEMM, the
    kernel (checked: `kernel_check`), at `QUICK_LAYER_MS` the XLA and Pallas W4A16 layers, and at
    the first shape a per-group kernel check; each row printed as it completes."""
    import json

    import jax

    from convrot_jax.ops import w4a16_linear
    from pallas_kernels.w4a16_matmul import w4a16_matmul

    print("META " + json.dumps({**harness.run_meta(), "iters": harness.timing_iters()}), flush=True)
    rows = []

    def add(row):
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)

    for i, (m, k, n) in enumerate(QUICK_SHAPES):
        shape = {"shape": f"M={m} K={k} N={n}", "m": m, "k": k, "n": n}
        layers = ("xla_w4a16_layer", "pallas_w4a16_layer") if n == 18432 and m in QUICK_LAYER_MS else ()
        for variant in ("xla_bf16", "pallas") + layers:
            if time.time() > args.deadline:
                return rows
            try:
                if variant == "xla_bf16":
                    ms = harness.device_time_ms(*bf16_gemm(m, n, k))
                    extra = {}
                elif variant == "pallas":
                    make = kernel_args(m, n, k)
                    extra = {"check": kernel_check(jax.jit(w4a16_matmul)(*make(0)), *make(0))}
                    ms = harness.device_time_ms(w4a16_matmul, make, m * n * 2)
                else:
                    impl = VARIANTS[variant].options["impl"]
                    ms = harness.device_time_ms(lambda x, qw, b: w4a16_linear(x, qw, b, implementation=impl),
                                                layer_args(m, n, k), m * n * 2)
                    extra = {}
                add({"variant": variant, **shape, "ms": ms,
                     "weight_gbs": weight_bytes(variant, n, k) / (ms * 1e-3) / 1e9, **extra})
            except Exception as e:  # noqa: BLE001  (recorded, the other cells still run)
                add({"variant": variant, **shape, "error": f"{type(e).__name__}: {e}"[:400]})
        if i == 0 and time.time() < args.deadline:  # per-group scales, checked once
            try:
                x, w, _, b = kernel_args(m, n, k)(0)
                sw = jax.random.uniform(jax.random.key(7), (n, k // 128), minval=0.5, maxval=1.5) * 0.01
                y = w4a16_matmul(x, w, sw, b, scale_group=128)
                add({"variant": "pallas_group128", **shape, "check": kernel_check(y, x, w, sw, b, 128)})
            except Exception as e:  # noqa: BLE001
                add({"variant": "pallas_group128", **shape, "error": f"{type(e).__name__}: {e}"[:400]})
    return rows


def kernel_times_us(fn, args) -> list[tuple[str, float]]:
    """Each kernel of one call (CUPTI, one input set, L2-warm, mean of 5): (name, us)."""
    import jax
    from jax.experimental.mosaic.gpu import profiler

    _, runs = profiler.measure(jax.jit(fn), aggregate=False, iterations=5)(*args)
    return [(name, 1e3 * sum(run[i][1] for run in runs) / len(runs)) for i, (name, _) in enumerate(runs[0])]


def work_probe(args) -> list[dict]:
    """Where the time goes: x's K permutation as the wrapper makes it (a gather of static columns)
    against the reshape-and-swap form, the W4A16 layer's kernels at M = 4 and 64, and each kernel
    of the call at M = 28 / 64 / 4 / 112 and T5's M = 512, beside the bf16 GEMM."""
    import json

    import jax
    import jax.numpy as jnp

    from convrot_jax.ops import w4a16_linear
    from pallas_kernels.int4_unpack import permute_k32
    from pallas_kernels.w4a16_matmul import w4a16_matmul

    print("META " + json.dumps({**harness.run_meta(), "iters": harness.timing_iters()}), flush=True)
    rows = []

    def add(row):
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)

    for m in (64, 28):
        pad = lambda x: jnp.pad(x, ((0, -m % 8), (0, 0)))  # noqa: E731  (the kernel's tile_m rounding)
        forms = {"permute_take": lambda x: pad(permute_k32(x)),
                 "permute_swap": lambda x: pad(permute_k32(x, gather=False))}
        for name, f in forms.items():
            make = lambda i, m=m: (jax.random.normal(jax.random.key(i), (m, 3072), jnp.bfloat16),)  # noqa: E731
            add({"variant": name, "shape": f"M={m} K=3072", "ms": harness.device_time_ms(f, make),
                 "kernels": kernel_times_us(f, make(0))})
    layer = lambda x, qw, b: w4a16_linear(x, qw, b, implementation="pallas")  # noqa: E731
    for m in (4, 64):
        add({"variant": "pallas_w4a16_layer", "shape": f"M={m} K=3072 N=18432",
             "ms": harness.device_time_ms(layer, layer_args(m, 18432, 3072)),
             "kernels": kernel_times_us(layer, layer_args(m, 18432, 3072)(0))})
    cases = [(28, 3072, 18432), (64, 3072, 18432), (4, 3072, 18432), (112, 3072, 18432), (512, 4096, 10240)]
    for m, k, n in cases:
        if time.time() > args.deadline:
            break
        add({"variant": "xla_bf16", "shape": f"M={m} K={k} N={n}", "m": m, "k": k, "n": n,
             "ms": harness.device_time_ms(*bf16_gemm(m, n, k))})
        row = {"variant": "pallas", "shape": f"M={m} K={k} N={n}", "m": m, "k": k, "n": n}
        try:
            make = kernel_args(m, n, k)
            row["check"] = kernel_check(jax.jit(w4a16_matmul)(*make(0)), *make(0))
            row["kernels"] = kernel_times_us(w4a16_matmul, make(0))
            row["ms"] = harness.device_time_ms(w4a16_matmul, make, m * n * 2)
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        add(row)
    return rows


# ------------------------------------------------------------------------------------ results
def summarize(rows: list[dict]) -> list[dict]:
    """README figures: the kernel against the bf16 GEMM at the modulation shapes (M <= 112) and at
    T5's M = 512."""
    ok = {(r["shape"], r["variant"]): r for r in rows if "error" not in r and "ms" in r}
    out = []
    for label, pick in (("modulation, M <= 112", lambda r: r["m"] <= 112), ("T5-XXL, M = 512", lambda r: r["m"] == 512)):
        pairs = [(r, ok[(s, BASELINE)]) for (s, v), r in ok.items() if v == "pallas" and pick(r) and (s, BASELINE) in ok]
        if pairs:
            out.append(harness.figure(
                "W4A16 GEMM, Mosaic GPU kernel", f"{harness.span(r['weight_gbs'] for r, _ in pairs)} GB/s of int4 weight",
                shape=label, baseline="XLA bf16 GEMM",
                ratio=harness.span((b["ms"] / r["ms"] for r, b in pairs), "{:.2f}") + "x"))
    return out


def markdown(log: dict) -> list[str]:
    rows = log.get("rows", [])
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    out = ["# W4A16 GEMM (pallas_kernels/w4a16_matmul.py) vs XLA", "",
           f"Device time (CUPTI), median of {log.get('iters', 20)}, rotating input sets (> 2x L2). Ratios: "
           f"{BASELINE} time / this time (higher is faster). Layers: convrot_jax.ops.w4a16_linear (xla: rotate, "
           "dequantize the weight in XLA, dot; pallas: rotate in XLA, this kernel). "
           f"GPU tests: {log.get('tests', 'not run')}.", "", "Time (us):", ""]
    for r in rows:
        if "ms" in r:
            r["us"] = r["ms"] * 1e3
    out += harness.pivot_table(rows, "us", "{:.1f}", baseline=BASELINE, shape_cols=("m", "k", "n"), variants=variants)
    out += ["", "Weight GB/s (bytes of the weight each variant reads / time; copy bandwidth ~4300):", ""]
    out += harness.pivot_table(rows, "weight_gbs", shape_cols=("m", "k", "n"), variants=variants)
    checks = [(r["shape"], r["variant"], r["check"]) for r in rows if "check" in r]
    if checks:
        out += ["", "Kernel vs its float32 reference, max |error| / derived bound (<= 1 passes): " + "; ".join(
            f"{v} {s}: {c:.2f}" for s, v, c in checks) + "."]
    errs = [r["err_ulp"] for r in rows if "err_ulp" in r]
    if errs:
        out += ["", f"Kernel vs its float32 reference: max error {max(errs):.2f} bf16 ulps over the shapes."]
    if log.get("sweep"):
        out += ["", "Tile configs (err in bf16 ulps of the reference; <= 1 passes):", ""]
        out += harness.md_table(["M", "K", "N", "impl / config", "us", "of which XLA ops", "vs bf16", "weight GB/s",
                                 "err ulp"], [
            (r["m"], r["k"], r["n"], r.get("impl") or r["config"], f"{r['ms'] * 1e3:.1f}" if "ms" in r else r.get("error"),
             f"{r['xla_us']:.1f}" if "xla_us" in r else "", f"{r['vs_bf16']:.2f}x" if "vs_bf16" in r else "",
             f"{r['weight_gbs']:.0f}" if "weight_gbs" in r else "", f"{r['err_ulp']:.2f}" if "err_ulp" in r else "")
            for r in log["sweep"]])
    return out


def results_from_quick_log(path: Path, out_dir: Path) -> None:
    """Writes the results files from the META and ROW lines of a `--worker quick` run's log
    (a GPU slot too short for the parent's stages: the rows come back as text)."""
    import json

    meta, rows = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("META "):
            meta = json.loads(line[5:])
        elif line.startswith("ROW "):
            rows.append(json.loads(line[4:]))
    log = {"iters": meta.pop("iters", harness.timing_iters()), "rows": rows,
           "tests": "the quick run's kernel checks (column check, <= 1 passes)"}
    harness.write_results(NAME, log, markdown(log), out_dir, summary=summarize(rows), meta=meta,
                          command="python -m " + MODULE + " --worker quick")


def stage_tests(out_dir, log, args):
    log["tests"] = harness.run_pytest("tests/test_w4a16_matmul.py", args.tests_k, timeout=args.tests_timeout)


def stage_bench(out_dir, log, args):
    log["rows"] = []
    for group, names in harness.process_groups(VARIANTS, args.variants).items():
        got = harness.run_isolated(harness.worker_command(MODULE, "grid:" + ",".join(names), args.argv),
                                   timeout=args.variant_timeout, label=group)
        log["rows"] += harness.error_rows(names, got["error"], shape="all") if isinstance(got, dict) else got


STAGES = {
    "tests": stage_tests,
    "sweep": harness.worker_stage(MODULE, "sweep"),
    "bench": stage_bench,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.stage_parser(__doc__, budget_s=540, tests_k="gpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--tests-timeout", type=float, default=600, help="seconds the tests stage may run")
    p.add_argument("--quick-log", type=Path, help="write the results from a `--worker quick` log instead")
    args = p.parse_args(argv)
    if args.quick_log:
        results_from_quick_log(args.quick_log, args.out)
        return
    if args.worker:
        args.deadline = args.deadline or time.time() + args.budget_s
        kind, _, names = args.worker.partition(":")
        work = {"sweep": lambda: work_sweep(args), "quick": lambda: work_quick(args),
                "probe": lambda: work_probe(args)}.get(kind)
        harness.emit(work() if work else work_group(names.split(","), args))
        return
    harness.run_stage_bench(NAME, MODULE, STAGES, argv, args, markdown, lambda log: summarize(log.get("rows", [])))


if __name__ == "__main__":
    main()
