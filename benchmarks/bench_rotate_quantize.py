"""GPU benchmark of the fused rotate+quantize kernel against XLA and a plain device copy.

Runs the kernel's gpu-marked tests first (one GPU visit checks and measures), then, for each
FLUX shape M x K, times in one process: the kernel (int8 codes and packed codes), the XLA
reference, and a device copy; with the LayerNorm+modulation prologue, also XLA's
LayerNorm+modulation alone. GB/s counts each input read once and each output written once.

Timing: one jitted call runs the op on n distinct inputs back to back (n chosen so the inputs
overflow L2); the time per op is the slope between n and 2n ops, which removes the fixed
dispatch cost. Median of `--repeats` slopes.

    PYTHONPATH=. python3 benchmarks/bench_rotate_quantize.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.rotate_quantize import RotateQuantizeConfig, apply_prologue, rotate_quantize, rotate_quantize_reference

MS = (512, 1536, 4608, 9216)
KS = (3072, 12288, 15360)
LAYERNORM_K, GELU_K = 3072, 12288  # what feeds q/k/v and MLP-up; what feeds MLP-down
L2_FLUSH_BYTES = 256 << 20


def _time_op(fn, make_input, in_bytes: int, repeats: int) -> float:
    """Seconds per op: slope of the wall time between n and 2n back-to-back ops."""
    n = int(min(32, max(2, math.ceil(L2_FLUSH_BYTES / in_bytes))))
    pool = [make_input(i) for i in range(2 * n)]
    run_n = jax.jit(lambda xs: [fn(*x) for x in xs])
    for batch in (pool[:n], pool):
        jax.block_until_ready(run_n(batch))  # compile + warm up
    slopes = []
    for _ in range(repeats):
        t = []
        for batch in (pool[:n], pool):
            t0 = time.perf_counter()
            jax.block_until_ready(run_n(batch))
            t.append(time.perf_counter() - t0)
        slopes.append((t[1] - t[0]) / n)
    del pool
    return statistics.median(slopes)


def _x(m, k, dtype=jnp.bfloat16):
    def make(i):
        return (jax.random.normal(jax.random.key(i), (m, k), jnp.float32) * (1 + i % 3)).astype(dtype)

    return make


def _gbs(nbytes, sec):
    return nbytes / sec / 1e9


def run_tests() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_rotate_quantize.py"],
        capture_output=True,
        text=True,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:], flush=True)
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else f"pytest rc={proc.returncode}"


SWEEP_M = 4608
SWEEP = (  # (block_rows, groups_per_tile, split_levels, num_warps, swap_halves)
    (1, 4, 0, 4, False),  # every level shuffled in registers, 4-group tiles, 4 warps
    (1, 16, 0, 4, False),  # fewer, larger tiles: 97 instead of 291 layout conversions at K=15360 (TTGIR)
    (1, 8, 0, 4, False),
    (1, 4, 0, 4, True),  # two transposes per row, levels on 16-wide trailing axes (the default)
    (1, 16, 0, 4, True),  # not yet measured: both of 2026-11-24's gains at K=15360 (swap 521, gpt16 458 GB/s)
    (1, 4, 0, 16, False),  # 2026-11-24, K=15360: 16 warps 247 GB/s, 4 warps 439
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--ms", type=int, nargs="+", default=MS, help="token counts to time")
    ap.add_argument("--sweep", action="store_true", help="time SWEEP configs at M=4608 first; use the best")
    ap.add_argument("--sweep-ks", type=int, nargs="+", default=list(KS), help="K values the sweep times")
    ap.add_argument("--budget-s", type=float, default=480, help="stop starting new rows after this")
    args = ap.parse_args()
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    result = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": [], "prologue": [], "sweep": []}
    result["tests"] = "skipped" if args.skip_tests else run_tests()
    r = args.repeats

    def save():
        with open(os.path.join(args.out, "rotate_quantize.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "rotate_quantize.md"), "w") as f:
            f.write(_markdown(result))

    def over_budget():
        return time.time() - start > args.budget_s

    cfg = RotateQuantizeConfig()
    if args.sweep:
        m, totals = SWEEP_M, {}
        for k in args.sweep_ks:
            make = _x(m, k)
            x = make(0)
            cpu = jax.devices("cpu")[0]
            with jax.default_device(cpu):  # ground truth off XLA:GPU's arithmetic, as in the tests
                want = jax.tree.map(np.asarray, rotate_quantize_reference(jax.device_put(x, cpu)))
            for br, gpt, split, warps, swap in SWEEP:
                if over_budget():
                    break
                c = RotateQuantizeConfig(block_rows=br, groups_per_tile=gpt, split_levels=split, num_warps=warps,
                                         swap_halves=swap)
                try:
                    got = jax.tree.map(np.asarray, rotate_quantize(x, config=c))
                    sec = _time_op(lambda x: rotate_quantize(x, config=c), lambda i: (make(i),), 2 * m * k, r)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is a result
                    print("sweep", c, "failed:", repr(e)[:1500], flush=True)
                    continue
                same = bool((got[0] == want[0]).all() and np.array_equal(got[1], want[1], equal_nan=True))
                entry = dict(m=m, k=k, block_rows=br, groups_per_tile=gpt, split_levels=split, num_warps=warps,
                             swap_halves=swap)
                entry.update(kernel_s=sec, kernel_gbs=_gbs(3 * m * k + 4 * m, sec), identical_to_xla=same)
                result["sweep"].append(entry)
                print("sweep", entry, flush=True)
                if same:
                    totals[c] = totals.get(c, 0.0) + sec
                save()
        full = [c for c in totals
                if sum(1 for e in result["sweep"] if _matches(e, c) and e["identical_to_xla"]) == len(args.sweep_ks)]
        if full:
            cfg = min(full, key=totals.get)
        result["config"] = dataclasses.asdict(cfg)
        print("chosen", cfg, flush=True)

    for m in args.ms:
        for k in KS:
            if over_budget():
                break
            mk = m * k
            row = {"m": m, "k": k, "bytes_int8": 3 * mk + 4 * m, "bytes_packed": 2 * mk + mk // 2 + 4 * m}
            try:
                _measure_row(row, _x(m, k), mk, r, cfg)
            except Exception as e:  # noqa: BLE001 - keep measuring the other shapes, record why
                print(f"M={m} K={k} failed: {e!r}"[:2000], flush=True)
                continue
            result["rows"].append(row)
            print(_row_line(row), flush=True)
            save()
        if over_budget():
            break
        for q in _measure_prologues(m, r, cfg):
            result["prologue"].append(q)
            print(_prologue_line(q), flush=True)
        save()

    save()
    print(_markdown(result))


def _matches(entry: dict, c: RotateQuantizeConfig) -> bool:
    fields = ("block_rows", "groups_per_tile", "split_levels", "num_warps", "swap_halves")
    return all(entry[f] == getattr(c, f) for f in fields)


def _measure_prologues(m: int, r: int, cfg: RotateQuantizeConfig) -> list[dict]:
    """LayerNorm+modulation (K=3072, B=2 images) and tanh-GELU (K=12288): kernel vs XLA."""
    k = LAYERNORM_K
    make = _x(m, k)

    def make_mod(i):
        key = jax.random.key(1000 + i)
        return make(i), *(0.3 * jax.random.normal(key, (2, 2, k), jnp.float32)).astype(jnp.bfloat16)

    p = {"m": m, "k": k, "prologue": "layernorm+modulation"}
    p["kernel_s"] = _time_op(
        lambda x, sh, sc: rotate_quantize(x, prologue="layernorm", shift=sh, scale=sc, config=cfg), make_mod, 2 * m * k, r
    )
    p["xla_prologue_only_s"] = _time_op(
        lambda x, sh, sc: apply_prologue(x, "layernorm", sh, sc).astype(x.dtype), make_mod, 2 * m * k, r
    )
    p["xla_full_s"] = _time_op(
        lambda x, sh, sc: rotate_quantize_reference(x, prologue="layernorm", shift=sh, scale=sc), make_mod, 2 * m * k, r
    )
    k = GELU_K
    one = _x(m, k)
    g = {"m": m, "k": k, "prologue": "gelu_tanh"}
    g["kernel_s"] = _time_op(lambda x: rotate_quantize(x, prologue="gelu_tanh", config=cfg), lambda i: (one(i),), 2 * m * k, r)
    g["xla_prologue_only_s"] = _time_op(
        lambda x: apply_prologue(x, "gelu_tanh").astype(x.dtype), lambda i: (one(i),), 2 * m * k, r
    )
    g["xla_full_s"] = _time_op(lambda x: rotate_quantize_reference(x, prologue="gelu_tanh"), lambda i: (one(i),), 2 * m * k, r)
    return [p, g]


def _measure_row(row: dict, make, mk: int, r: int, cfg: RotateQuantizeConfig) -> None:
    """Kernel (int8, packed), XLA reference and copy times for one shape."""
    one = lambda i: (make(i),)  # noqa: E731
    row["kernel_s"] = _time_op(lambda x: rotate_quantize(x, config=cfg), one, 2 * mk, r)
    row["packed_s"] = _time_op(lambda x: rotate_quantize(x, packed=True, config=cfg), one, 2 * mk, r)
    row["xla_s"] = _time_op(lambda x: rotate_quantize_reference(x), one, 2 * mk, r)
    row["copy_s"] = _time_op(lambda x: -x, one, 2 * mk, r)  # reads 2mk, writes 2mk bytes
    row["kernel_gbs"] = _gbs(row["bytes_int8"], row["kernel_s"])
    row["packed_gbs"] = _gbs(row["bytes_packed"], row["packed_s"])
    row["xla_gbs"] = _gbs(row["bytes_int8"], row["xla_s"])
    row["copy_gbs"] = _gbs(4 * mk, row["copy_s"])


def _row_line(r) -> str:
    return (
        f"M={r['m']:5d} K={r['k']:5d}  kernel {r['kernel_gbs']:7.0f} GB/s ({r['kernel_s'] * 1e6:7.1f} us)  "
        f"packed {r['packed_gbs']:7.0f}  xla {r['xla_gbs']:6.0f}  copy {r['copy_gbs']:6.0f}  "
        f"kernel/copy {r['kernel_gbs'] / r['copy_gbs']:.2f}  kernel/xla {r['xla_s'] / r['kernel_s']:.1f}x"
    )


def _prologue_line(p) -> str:
    return (
        f"{p['prologue']:22s} M={p['m']:5d} K={p['k']:5d}  kernel {p['kernel_s'] * 1e6:7.1f} us  "
        f"xla prologue alone {p['xla_prologue_only_s'] * 1e6:7.1f} us  xla prologue+quant {p['xla_full_s'] * 1e6:7.1f} us"
        f"  (alone/kernel {p['xla_prologue_only_s'] / p['kernel_s']:.2f}x)"
    )


def _markdown(res) -> str:
    out = [
        "# rotate_quantize benchmark",
        "",
        f"Device: {res['device']}, jax {res['jax']}. Tests (gpu-marked, same visit): {res['tests']}.",
        "GB/s = (bytes read + bytes written) / time; the copy is an elementwise bf16 negation of the",
        "same input (reads 2MK, writes 2MK bytes). Time per op: slope between n and 2n back-to-back",
        "ops on distinct inputs (median), so launch overhead is excluded.",
        "",
        f"Kernel config: {res.get('config', 'default')}.",
        "",
        "| M | K | kernel int8 GB/s | kernel packed GB/s | XLA ref GB/s | copy GB/s | kernel / copy | kernel vs XLA |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in res["rows"]:
        out.append(
            f"| {r['m']} | {r['k']} | {r['kernel_gbs']:.0f} | {r['packed_gbs']:.0f} | {r['xla_gbs']:.0f} | "
            f"{r['copy_gbs']:.0f} | {r['kernel_gbs'] / r['copy_gbs']:.2f} | {r['xla_s'] / r['kernel_s']:.1f}x |"
        )
    if res["prologue"]:
        out += [
            "",
            "Prologues (int8 codes out; B=2 images for the modulation):",
            "",
            "| prologue | M | K | kernel us | XLA prologue alone us | XLA prologue + reference quant us | prologue alone / kernel |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in res["prologue"]:
            out.append(
                f"| {p['prologue']} | {p['m']} | {p['k']} | {p['kernel_s'] * 1e6:.1f} | "
                f"{p['xla_prologue_only_s'] * 1e6:.1f} | {p['xla_full_s'] * 1e6:.1f} | "
                f"{p['xla_prologue_only_s'] / p['kernel_s']:.2f}x |"
            )
    if res["sweep"]:
        out += [
            "",
            "Block configs at M=4608 (int8 out; identical = codes and scales equal to the XLA reference run on the CPU):",
            "",
            "| K | block_rows | groups_per_tile | split_levels | num_warps | swap_halves | GB/s | identical |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e in res["sweep"]:
            out.append(
                f"| {e['k']} | {e['block_rows']} | {e['groups_per_tile']} | {e['split_levels']} | "
                f"{e['num_warps']} | {e.get('swap_halves', False)} | {e['kernel_gbs']:.0f} | {e['identical_to_xla']} |"
            )
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
