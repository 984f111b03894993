"""Rotate + int4 quantize: the Mosaic GPU kernel against the XLA reference and a device copy.

Implementations (x the named FLUX shapes M x K, M in FLUX_TOKEN_COUNTS, K in FLUX's input widths):
  pallas         pallas_kernels.rotate_quantize (Mosaic GPU, what convrot_jax.ops uses), int8 codes
  pallas_packed  the same, codes packed two a byte
  xla            rotate_quantize_reference (the baseline: the XLA composition it is tested against)
  copy           an elementwise bf16 negation of the same input (reads 2MK, writes 2MK bytes)
GB/s counts each input read once and each output written once. `--prologues`: the producers
quantized where they are made, as FLUX runs them (one image): LayerNorm+modulation (K = 3072),
tanh-GELU (K = 12288) and tanh-GELU on the columns from 3072 on (K = 15360, single blocks'
[attention, GELU(MLP)]), the kernel with the prologue fused against XLA's producer writing bf16
then the kernel (what the model runs without the fusion: the baseline), XLA's producer alone and
XLA's producer + the reference quantizer; `--prologue-configs` adds the fused kernel at more
block configs (JSON list; each cell also counts the codes that differ from the default config's).
`--sweep`: block configs at M = 4608, each checked bit-identical to the reference run on the CPU;
the fastest that passes at every K is then used for the table. `--tests`: the GPU tests of tests/test_rotate_quantize.py first.
Each implementation runs in its own process (benchmarks.harness); device time (CUPTI), median of
20 over rotating input sets larger than L2.

    PYTHONPATH=. python3 -m benchmarks.bench_rotate_quantize [--sweep] [--prologues] [--tests]
    PYTHONPATH=. JAX_PLATFORMS=cpu python3 -m benchmarks.bench_rotate_quantize --variants xla copy \\
        --ms 256 --ks 512 --no-prologues --out /tmp/rq   # CPU smoke test (host clock)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import Variant

NAME = "rotate_quantize"
MODULE = "benchmarks.bench_rotate_quantize"
KS = (3072, 12288, 15360)  # FLUX's token-linear input widths (pallas_kernels.shapes)
SWEEP_M = 4608
SWEEP = (  # RotateQuantizeConfig fields; invalid ones for a K are skipped
    {},  # the fewest rows that tile K, chunks of 8 x 16 values, one pass where it fits
    {"chunk_mult": 2},
    {"chunk_mult": 3},
    {"rows": 2},
    {"rows": 4},
    {"keep": False},
)
BASELINE = "xla"
VARIANTS = harness.registry(
    Variant("pallas", "Mosaic GPU kernel, int8 codes", options={"packed": False}),
    Variant("pallas_packed", "Mosaic GPU kernel, packed int4 codes", options={"packed": True}),
    Variant("xla", "XLA reference (prologue + convrot_jax.quant reference quantizer)"),
    Variant("copy", "device copy of the input (bf16 negation)"),
)
PROLOGUE_BASELINE = "xla_then_pallas"
PROLOGUE_VARIANTS = harness.registry(
    Variant("pallas", "the kernel with the prologue fused"),
    Variant("xla_then_pallas", "XLA's producer (bf16 out), then the kernel"),
    Variant("xla_prologue_only", "XLA's producer alone (no quantization)"),
    Variant("xla_full", "XLA's producer + the reference quantizer"),
)


def shapes(ms, ks) -> dict[str, dict[str, int]]:
    return {f"M={m} K={k}": {"m": m, "k": k} for m in ms for k in ks}


def prologue_shapes(ms) -> dict[str, dict]:
    out = {}
    for m in ms:
        out[f"layernorm+modulation M={m} K=3072"] = {"m": m, "k": 3072, "prologue": "layernorm", "images": 1}
        out[f"gelu_tanh M={m} K=12288"] = {"m": m, "k": 12288, "prologue": "gelu_tanh", "images": 0}
        out[f"gelu_tanh from 3072 M={m} K=15360"] = {"m": m, "k": 15360, "prologue": "gelu_tanh", "images": 0,
                                                      "gelu_from": 3072}
    return out


def moved_bytes(variant: str, m: int, k: int) -> int:
    if variant == "copy":
        return 4 * m * k
    if variant == "pallas_packed":
        return 2 * m * k + m * k // 2 + 4 * m
    return 3 * m * k + 4 * m


# ------------------------------------------------------------------------------------ worker
def _inputs(m, k, images=0):
    import jax
    import jax.numpy as jnp

    def make(i):
        x = (jax.random.normal(jax.random.key(i), (m, k), jnp.float32) * (1 + i % 3)).astype(jnp.bfloat16)
        if not images:
            return (x,)
        sh_sc = (0.3 * jax.random.normal(jax.random.key(1000 + i), (2, images, k), jnp.float32)).astype(jnp.bfloat16)
        return (x, *sh_sc)

    return make


def _config(args):
    from pallas_kernels.rotate_quantize import RotateQuantizeConfig

    return RotateQuantizeConfig(**json.loads(args.config))


def work_grid(variant: str, args) -> list[dict]:
    from pallas_kernels.rotate_quantize import rotate_quantize
    from pallas_kernels.rotate_quantize_reference import rotate_quantize_reference

    cfg = _config(args) if variant.startswith("pallas") else None
    fn = {"pallas": lambda x: rotate_quantize(x, config=cfg),
          "pallas_packed": lambda x: rotate_quantize(x, packed=True, config=cfg),
          "xla": lambda x: rotate_quantize_reference(x),
          "copy": lambda x: -x}[variant]
    return harness.time_grid(
        shapes(args.ms, args.ks), variant, lambda d: (fn, _inputs(d["m"], d["k"]), 0),
        lambda d, ms: {"bytes": moved_bytes(variant, d["m"], d["k"]),
                       "gbs": moved_bytes(variant, d["m"], d["k"]) / (ms * 1e-3) / 1e9},
        deadline=args.deadline)


def work_prologue(variant: str, args) -> list[dict]:
    from pallas_kernels.rotate_quantize import RotateQuantizeConfig, rotate_quantize
    from pallas_kernels.rotate_quantize_reference import apply_prologue, rotate_quantize_reference

    def setup(d, cfg=None):
        p, kw = d["prologue"], {"gelu_from": d.get("gelu_from", 0)}

        def producer(x, *mod):  # what the model's XLA producer writes: bf16
            return apply_prologue(x, p, *mod, **kw).astype(x.dtype)

        def mod_kw(mod):
            return {"shift": mod[0], "scale": mod[1]} if mod else {}

        fn = {"pallas": lambda x, *mod: rotate_quantize(x, prologue=p, config=cfg, **mod_kw(mod), **kw),
              "xla_then_pallas": lambda x, *mod: rotate_quantize(producer(x, *mod)),
              "xla_prologue_only": producer,
              "xla_full": lambda x, *mod: rotate_quantize_reference(x, prologue=p, **mod_kw(mod), **kw)}[variant]
        return fn, _inputs(d["m"], d["k"], d["images"]), 0

    rows = harness.time_grid(prologue_shapes(args.prologue_ms), variant, setup, deadline=args.deadline)
    if variant == "pallas":
        for fields in json.loads(args.prologue_configs):
            # `fast_tanh` changes the GELU kernels only; without `persistent`, the grid fields the modulated ones.
            changed = ((lambda d: d["prologue"] == "gelu_tanh") if fields.get("fast_tanh")
                       else (lambda d: d["images"] or fields.get("persistent")))
            grid = {name: d for name, d in prologue_shapes(args.prologue_ms).items() if changed(d)}
            got = harness.time_grid(grid, f"pallas {json.dumps(fields)}",
                                    functools.partial(setup, cfg=RotateQuantizeConfig(**fields)),
                                    deadline=args.deadline)
            for row in got:  # codes differing from the default config's (a config must not change them)
                if "ms" not in row:
                    continue
                d = grid[row["shape"]]
                inputs = _inputs(d["m"], d["k"], d["images"])(0)
                try:
                    a, b = (setup(d, cfg=RotateQuantizeConfig(**f))[0](*inputs)[0] for f in ({}, fields))
                    row["codes_differing"] = int((a != b).sum())
                except Exception as e:  # noqa: BLE001 - recorded; the timings stand
                    row["codes_differing"] = f"{type(e).__name__}: {e}"[:200]
                print(f"  {row['variant']} {row['shape']}: codes differing from the default: {row['codes_differing']}",
                      flush=True)
            rows += got
    return rows


def work_sweep(args) -> dict:
    """Times SWEEP at M = SWEEP_M; returns its rows and the fastest config identical at every K."""
    import jax
    import numpy as np

    from pallas_kernels.rotate_quantize import RotateQuantizeConfig, plan, rotate_quantize
    from pallas_kernels.rotate_quantize_reference import rotate_quantize_reference

    rows, totals = [], {}
    cpu = jax.devices("cpu")[0]
    for k in args.ks:
        make = _inputs(SWEEP_M, k)
        (x,) = make(0)
        with jax.default_device(cpu):  # ground truth off XLA:GPU's arithmetic, as in the tests
            want = jax.tree.map(np.asarray, rotate_quantize_reference(jax.device_put(x, cpu)))
        for fields in SWEEP:
            if time.time() > args.deadline:
                break
            c = RotateQuantizeConfig(**fields)
            try:
                n_rows, chunk, _ = plan(k, 256, c)
                got = jax.tree.map(np.asarray, rotate_quantize(x, config=c))
                ms = harness.device_time_ms(functools.partial(rotate_quantize, config=c), make)
            except Exception as e:  # noqa: BLE001 - a config that does not fit this K is a result
                print(f"sweep K={k} {c}: {e!r}"[:400], flush=True)
                continue
            same = bool((got[0] == want[0]).all() and np.array_equal(got[1], want[1], equal_nan=True))
            rows.append({"m": SWEEP_M, "k": k, "config": fields, "rows": n_rows, "chunk_groups": chunk, "ms": ms,
                         "gbs": moved_bytes("pallas", SWEEP_M, k) / (ms * 1e-3) / 1e9, "identical_to_xla": same})
            print("sweep", rows[-1], flush=True)
            if same:
                totals.setdefault(json.dumps(fields, sort_keys=True), []).append(ms)
    full = [c for c, t in totals.items() if len(t) == len(args.ks)]
    best = min(full, key=lambda c: sum(totals[c])) if full else "{}"
    return {"sweep": rows, "best": json.loads(best), "default": dataclasses.asdict(RotateQuantizeConfig())}


# ------------------------------------------------------------------------------------ results
def summarize(rows: list[dict]) -> list[dict]:
    """README figures: the kernel at the largest M <= 4608 (FLUX 1024², one image) per K."""
    ok = {(r["shape"], r["variant"]): r for r in rows if "error" not in r and "gbs" in r}
    ms_ = sorted({r["m"] for r in rows if ("M=%d K=%d" % (r["m"], r["k"]), "pallas") in ok})
    if not ms_:
        return []
    m = max([x for x in ms_ if x <= 4608] or ms_)
    cells = []
    for k in sorted({r["k"] for r in rows if r["m"] == m}):
        s = f"M={m} K={k}"
        if (s, "pallas") in ok and (s, BASELINE) in ok:
            cells.append((k, ok[(s, "pallas")], ok[(s, BASELINE)], ok.get((s, "copy"))))
    if not cells:
        return []
    gbs = "/".join(f"{p['gbs']:.0f}" for _, p, _, _ in cells)
    of_copy = [p["gbs"] / c["gbs"] for _, p, _, c in cells if c]
    return [harness.figure(
        "rotate-quantize, Mosaic GPU kernel", f"{gbs} GB/s" + (f" ({harness.span(of_copy, '{:.2f}')} of a device copy)"
                                                             if of_copy else ""),
        shape=f"M = {m}, K = " + "/".join(str(k) for k, *_ in cells), baseline="XLA reference",
        ratio=harness.span([b["ms"] / p["ms"] for _, p, b, _ in cells], "{:.1f}") + "x")]


def markdown(res: dict) -> list[str]:
    iters = res.get("iters", 20)
    out = ["# rotate_quantize: Mosaic GPU kernel vs XLA and a device copy", "",
           f"Device time (CUPTI), median of {iters}, rotating input sets (> 2x L2). GB/s = (bytes read + bytes "
           "written) / time; copy = an elementwise bf16 negation of the same input (reads 2MK, writes 2MK bytes). "
           f"Ratios: {BASELINE} time / this time (higher is faster). GPU tests: {res.get('tests', 'not run')}. "
           f"Kernel config: {res.get('config') or 'default'}.", "", "GB/s:", ""]
    out += harness.pivot_table(res["rows"], "gbs", baseline=BASELINE, shape_cols=("m", "k"),
                               variants=[v for v in list(VARIANTS) + ["triton"]
                                         if any(r["variant"] == v for r in res["rows"])])
    if res.get("prologue"):
        out += ["", "Producers quantized where they are made (int8 codes out; one image), us; the baseline "
                f"{PROLOGUE_BASELINE} = XLA's producer writing bf16, then the kernel:", ""]
        out += harness.pivot_table([dict(r, us=r["ms"] * 1e3) if "ms" in r else r for r in res["prologue"]], "us",
                                   "{:.1f}", baseline=PROLOGUE_BASELINE)
    if res.get("sweep"):
        out += ["", f"Kernel block configs at M={SWEEP_M} (int8 out; identical = codes and scales equal to the "
                "XLA reference run on the CPU):", ""]
        out += harness.md_table(["K", "config", "rows", "groups per chunk", "GB/s", "identical"],
                                [(e["k"], e["config"] or "default", e["rows"], e["chunk_groups"], f"{e['gbs']:.0f}",
                                  e["identical_to_xla"]) for e in res["sweep"]])
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.argument_parser(__doc__)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="the M x K grid's implementations (none: only the prologues)")
    p.add_argument("--ms", type=int, nargs="+", default=None, help="token counts (default FLUX_TOKEN_COUNTS)")
    p.add_argument("--ks", type=int, nargs="+", default=list(KS), help="feature counts")
    p.add_argument("--sweep", action="store_true", help="time SWEEP configs at M=4608 first; use the best")
    p.add_argument("--prologues", action=argparse.BooleanOptionalAction, default=True,
                   help="time the LayerNorm+modulation and GELU prologues too")
    p.add_argument("--prologue-ms", type=int, nargs="+", default=[4608, 1536], help="token counts for the prologues")
    p.add_argument("--prologue-variants", nargs="+", default=list(PROLOGUE_VARIANTS), choices=list(PROLOGUE_VARIANTS))
    p.add_argument("--prologue-configs", default="[]",
                   help="JSON list of RotateQuantizeConfig fields: the fused kernel at these configs too")
    p.add_argument("--tests", action="store_true", help="run the GPU tests of tests/test_rotate_quantize.py first")
    p.add_argument("--config", default="{}", help="RotateQuantizeConfig fields as JSON (default: the kernel's)")
    p.add_argument("--budget-s", type=float, default=480, help="start no new measurement after this many seconds")
    p.add_argument("--variant-timeout", type=float, default=300, help="seconds each variant process may run")
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ms is None:
        from pallas_kernels.shapes import FLUX_TOKEN_COUNTS

        args.ms = list(FLUX_TOKEN_COUNTS)
    if args.worker:
        args.deadline = args.deadline or time.time() + args.budget_s
        kind, _, variant = args.worker.partition(":")
        harness.emit(work_sweep(args) if kind == "sweep" else
                     work_prologue(variant, args) if kind == "prologue" else work_grid(variant, args))
        return
    deadline = time.time() + args.budget_s
    common = [*argv, "--ms", *map(str, args.ms), "--deadline", str(deadline)]
    res: dict = {"rows": [], "prologue": [], "sweep": [], "iters": harness.timing_iters()}
    res["tests"] = harness.run_pytest("tests/test_rotate_quantize.py", "gpu") if args.tests else "not run"
    if args.sweep:
        got = harness.run_isolated(harness.worker_command(MODULE, "sweep", common), timeout=args.variant_timeout)
        if "error" not in got:
            res["sweep"], args.config = got["sweep"], json.dumps(got["best"])
    res["config"] = json.loads(args.config)
    common += ["--config", args.config]
    meta = None
    for v in args.variants:
        got = harness.run_isolated(harness.worker_command(MODULE, f"grid:{v}", common), timeout=args.variant_timeout,
                                   label=v)
        res["rows"] += harness.error_rows([v], got["error"], shape="all") if isinstance(got, dict) else got
    if args.prologues:
        for v in args.prologue_variants:
            got = harness.run_isolated(harness.worker_command(MODULE, f"prologue:{v}", common),
                                       timeout=args.variant_timeout, label=f"prologue {v}")
            res["prologue"] += harness.error_rows([v], got["error"], shape="all") if isinstance(got, dict) else got
    meta = harness.run_meta(probe=True)
    # A run of the producers alone (`--variants` given no names) has its own results file, so it
    # never replaces the kernel's table.
    name = NAME if args.variants else f"{NAME}_prologues"
    harness.write_results(name, res, markdown(res), args.out, summary=summarize(res["rows"]), meta=meta,
                          command="python -m " + MODULE + " " + " ".join(argv))
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
