"""GPU benchmark of the fused rotate+quantize kernel against XLA and a plain device copy.

For each FLUX shape M x K, in one process: the Mosaic GPU kernel (`rotate_quantize`, int8 and
packed codes), the XLA reference, and a device copy of the same input (an elementwise bf16
negation: reads 2MK, writes 2MK bytes). With `--sweep`, block configs of the kernel at M = 4608
first (each checked bit-identical to the reference run on the CPU); the fastest that passes
everywhere is then used. With `--prologue-ms`, the kernel's LayerNorm+modulation and GELU
prologues against XLA's. (Earlier results also list a Pallas Triton kernel, since removed:
benchmarks/notes/rotate_quantize.md.)
GB/s counts each input read once and each output written once.

Timing: device time (CUPTI, `benchmarks.timing.device_time_ms`), median of 20 iterations over
rotating input sets larger than L2.

    PYTHONPATH=. python3 benchmarks/bench_rotate_quantize.py --out benchmarks/results [--sweep] [--tests]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import ITERS, device_time_ms
from pallas_kernels.rotate_quantize import RotateQuantizeConfig, plan, rotate_quantize
from pallas_kernels.rotate_quantize_reference import apply_prologue, rotate_quantize_reference

MS = (512, 1536, 4608, 9216)
KS = (3072, 12288, 15360)
LAYERNORM_K, GELU_K = 3072, 12288  # what feeds q/k/v and MLP-up; what feeds MLP-down
SWEEP_M = 4608
SWEEP = (  # RotateQuantizeConfig fields; invalid ones for a K are skipped
    {},  # the fewest rows that tile K, chunks of 8 x 16 values, one pass where it fits
    {"chunk_mult": 2},
    {"chunk_mult": 3},
    {"rows": 2},
    {"rows": 4},
    {"keep": False},
)


def _x(m, k, dtype=jnp.bfloat16):
    def make(i):
        return ((jax.random.normal(jax.random.key(i), (m, k), jnp.float32) * (1 + i % 3)).astype(dtype),)

    return make


def _gbs(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def run_tests() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_rotate_quantize.py"],
        check=False,
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:], flush=True)
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"pytest rc={proc.returncode}"


def _sweep(result: dict, ks, over_budget) -> RotateQuantizeConfig:
    """Times SWEEP at M = SWEEP_M; returns the fastest config valid and identical at every K."""
    totals: dict[RotateQuantizeConfig, float] = {}
    cpu = jax.devices("cpu")[0]
    for k in ks:
        make = _x(SWEEP_M, k)
        (x,) = make(0)
        with jax.default_device(cpu):  # ground truth off XLA:GPU's arithmetic, as in the tests
            want = jax.tree.map(np.asarray, rotate_quantize_reference(jax.device_put(x, cpu)))
        for fields in SWEEP:
            c = RotateQuantizeConfig(**fields)
            if over_budget():
                break
            try:
                rows, chunk, _ = plan(k, 256, c)
                got = jax.tree.map(np.asarray, rotate_quantize(x, config=c))
                ms = device_time_ms(functools.partial(rotate_quantize, config=c), make)
            except Exception as e:  # noqa: BLE001 - a config that does not fit this K is a result
                print(f"sweep K={k} {c}: {e!r}"[:400], flush=True)
                continue
            same = bool((got[0] == want[0]).all() and np.array_equal(got[1], want[1], equal_nan=True))
            entry = {"m": SWEEP_M, "k": k, "config": fields, "rows": rows, "chunk_groups": chunk, "ms": ms,
                     "gbs": _gbs(3 * SWEEP_M * k + 4 * SWEEP_M, ms), "identical_to_xla": same}
            result["sweep"].append(entry)
            print("sweep", entry, flush=True)
            if same:
                totals.setdefault(c, []).append(ms)
    full = [c for c, t in totals.items() if len(t) == len(ks)]
    return min(full, key=lambda c: sum(totals[c])) if full else RotateQuantizeConfig()


def _measure_row(m: int, k: int, cfg: RotateQuantizeConfig) -> dict:
    mk = m * k
    make = _x(m, k)
    row = {"m": m, "k": k, "bytes_int8": 3 * mk + 4 * m, "bytes_packed": 2 * mk + mk // 2 + 4 * m, "copy_bytes": 4 * mk}
    row["kernel_ms"] = device_time_ms(lambda x: rotate_quantize(x, config=cfg), make)
    row["kernel_packed_ms"] = device_time_ms(lambda x: rotate_quantize(x, packed=True, config=cfg), make)
    row["xla_ms"] = device_time_ms(lambda x: rotate_quantize_reference(x), make)
    row["copy_ms"] = device_time_ms(lambda x: -x, make)
    for name, nbytes in (("kernel", "bytes_int8"), ("kernel_packed", "bytes_packed"), ("xla", "bytes_int8"),
                         ("copy", "copy_bytes")):
        row[f"{name}_gbs"] = _gbs(row[nbytes], row[f"{name}_ms"])
    return row


def _measure_prologues(m: int) -> list[dict]:
    """The kernel with LayerNorm+modulation (K=3072, B=2 images) and tanh-GELU (K=12288)
    prologues vs XLA's prologue alone and XLA's prologue + reference quantizer."""
    k = LAYERNORM_K
    make = _x(m, k)

    def make_mod(i):
        sh_sc = (0.3 * jax.random.normal(jax.random.key(1000 + i), (2, 2, k), jnp.float32)).astype(jnp.bfloat16)
        return (*make(i), *sh_sc)

    p = {"m": m, "k": k, "prologue": "layernorm+modulation"}
    p["kernel_ms"] = device_time_ms(
        lambda x, sh, sc: rotate_quantize(x, prologue="layernorm", shift=sh, scale=sc), make_mod)
    p["xla_prologue_only_ms"] = device_time_ms(
        lambda x, sh, sc: apply_prologue(x, "layernorm", sh, sc).astype(x.dtype), make_mod)
    p["xla_full_ms"] = device_time_ms(
        lambda x, sh, sc: rotate_quantize_reference(x, prologue="layernorm", shift=sh, scale=sc), make_mod)
    make = _x(m, GELU_K)
    g = {"m": m, "k": GELU_K, "prologue": "gelu_tanh"}
    g["kernel_ms"] = device_time_ms(lambda x: rotate_quantize(x, prologue="gelu_tanh"), make)
    g["xla_prologue_only_ms"] = device_time_ms(lambda x: apply_prologue(x, "gelu_tanh").astype(x.dtype), make)
    g["xla_full_ms"] = device_time_ms(lambda x: rotate_quantize_reference(x, prologue="gelu_tanh"), make)
    return [p, g]


def _row_line(r) -> str:
    return (
        f"M={r['m']:5d} K={r['k']:5d}  kernel {r['kernel_gbs']:6.0f} GB/s ({r['kernel_ms'] * 1e3:7.1f} us)  packed "
        f"{r['kernel_packed_gbs']:6.0f}  xla {r['xla_gbs']:5.0f}  copy {r['copy_gbs']:5.0f}"
        f"  kernel/copy {r['kernel_gbs'] / r['copy_gbs']:.2f}  vs xla {r['xla_ms'] / r['kernel_ms']:.1f}x"
    )


def _markdown(res) -> str:
    out = [
        "# rotate_quantize benchmark",
        "",
        f"Device: {res['device']}, jax {res['jax']}. GPU tests: {res['tests']}.",
        f"Device time (CUPTI), median of {ITERS}, rotating input sets (> 2x L2). GB/s = (bytes read + bytes",
        "written) / time; the copy is an elementwise bf16 negation of the same input (reads 2MK, writes",
        "2MK bytes). kernel = the Mosaic GPU kernel (`pallas_kernels.rotate_quantize`, what `convrot_jax.ops` uses).",
        "",
        f"kernel config: {res.get('config', 'default')}.",
        "",
        "| M | K | kernel int8 GB/s | kernel packed GB/s | XLA ref GB/s | copy GB/s | kernel / copy | kernel vs XLA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        out.append(
            f"| {r['m']} | {r['k']} | {r['kernel_gbs']:.0f} | {r['kernel_packed_gbs']:.0f} | "
            f"{r['xla_gbs']:.0f} | {r['copy_gbs']:.0f} | {r['kernel_gbs'] / r['copy_gbs']:.2f} | "
            f"{r['xla_ms'] / r['kernel_ms']:.1f}x |"
        )
    if res["prologue"]:
        out += [
            "",
            "Prologues (int8 codes out; B=2 images for the modulation):",
            "",
            ("| prologue | M | K | kernel us | XLA prologue alone us | XLA prologue + reference quant us "
             "| XLA prologue alone / kernel |"),
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in res["prologue"]:
            out.append(
                f"| {p['prologue']} | {p['m']} | {p['k']} | {p['kernel_ms'] * 1e3:.1f} | "
                f"{p['xla_prologue_only_ms'] * 1e3:.1f} | {p['xla_full_ms'] * 1e3:.1f} | "
                f"{p['xla_prologue_only_ms'] / p['kernel_ms']:.2f}x |"
            )
    if res["sweep"]:
        out += [
            "",
            f"kernel block configs at M={SWEEP_M} (int8 out; identical = codes and scales equal to the XLA reference run on the CPU):",
            "",
            "| K | config | rows | groups per chunk | GB/s | identical |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for e in res["sweep"]:
            out.append(f"| {e['k']} | {e['config'] or 'default'} | {e['rows']} | {e['chunk_groups']} | {e['gbs']:.0f} | "
                       f"{e['identical_to_xla']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tests", action="store_true", help="run tests/test_rotate_quantize.py first")
    ap.add_argument("--ms", type=int, nargs="+", default=MS, help="token counts to time")
    ap.add_argument("--ks", type=int, nargs="+", default=KS, help="feature counts to time")
    ap.add_argument("--sweep", action="store_true", help="time SWEEP configs at M=4608 first; use the best")
    ap.add_argument("--prologue-ms", type=int, nargs="*", default=[4608], help="token counts for the prologues")
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting new measurements after this")
    args = ap.parse_args()
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": [], "prologue": [], "sweep": []}
    result["tests"] = run_tests() if args.tests else "not run"

    def save():
        with open(os.path.join(args.out, "rotate_quantize.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "rotate_quantize.md"), "w") as f:
            f.write(_markdown(result))

    def over_budget():
        return time.time() - start > args.budget_s

    cfg = _sweep(result, args.ks, over_budget) if args.sweep else RotateQuantizeConfig()
    result["config"] = dataclasses.asdict(cfg)
    print("config", cfg, flush=True)
    for m in args.ms:
        for k in args.ks:
            if over_budget():
                break
            try:
                row = _measure_row(m, k, cfg)
            except Exception as e:  # noqa: BLE001 - keep measuring the other shapes, record why
                print(f"M={m} K={k} failed: {e!r}"[:2000], flush=True)
                continue
            result["rows"].append(row)
            print(_row_line(row), flush=True)
            save()
    for m in args.prologue_ms:
        if over_budget():
            break
        result["prologue"] += _measure_prologues(m)
        save()
    save()
    print(_markdown(result))


if __name__ == "__main__":
    main()
