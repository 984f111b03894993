"""LoRA down-projection h = (u A^T) * s at FLUX's LoRA'd layers: the kernel against XLA.

Implementations (x SITES: the W4A4 layers of FLUX.1-dev at 1024² with a LoRA, their input u as
the fused model makes it):
  xla             what the fused path ran before the kernel, and still runs with
                  `LowRank.down_kernel = False`: XLA's producer (the GELU, the [attention, MLP]
                  concatenation) in float32, rounded to bf16, one GEMM, times s, to bf16
                  (`pallas_kernels.lora_down_reference.down_projection_reference`; the baseline)
  pallas          pallas_kernels.lora_down: x (and the GELU's tail) read once, the GELU in registers
  pallas_nosplit  the same with one K range per 64-row tile (`LoRADownConfig(ctas_per_sm=None)`)
  pallas_smem     the same with the GELU'd tile stored to shared memory as wgmma's A operand
                  (`gelu_operand="smem"`) instead of from registers
  pallas_tk128    K tiles of 128 columns (16 KB of x a step instead of 8: half the steps, each
                  TMA copy twice as long)
  pallas_tk128_1cta  the same, aiming at 1 CTA per SM (half the K ranges: fewer partial sums,
                  longer pipelines) with a 6-deep ring
  pallas_deep_1cta   64-column tiles, 1 CTA per SM, an 8-deep ring
  pallas_nosplit_deep  no K split, 128-column K tiles, an 8-deep ring (as many as fit): no
                  partial sums, so no XLA launch after the kernel, on 64-72 SMs at 4096-4608 tokens
(At 4608 tokens the default splits K 4 ways: 12 steps a CTA at K = 3072, so the ring's fill and
drain are a large part of each CTA's time; the last four variants test that, and whether the
sites without a GELU (memory-bound) can do without the split and its summing launch.)
GB/s = the bytes of x (and the tail's columns) read once / time. Device time (CUPTI), median of 20
over rotating input sets (> 2x the 50 MB L2); each implementation in its own process.

    PYTHONPATH=. python3 -m benchmarks.bench_lora_down [--stages tests,bench] [--variants xla pallas ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import Variant

NAME = "lora_down"
MODULE = "benchmarks.bench_lora_down"
BASELINE = "xla"
VARIANTS = harness.registry(
    Variant("xla", "XLA producer + bf16 GEMM (down_projection_reference)"),
    Variant("pallas", "pallas_kernels.lora_down, default config"),
    Variant("pallas_nosplit", "pallas_kernels.lora_down, no K split", options={"ctas_per_sm": None}),
    Variant("pallas_smem", "pallas_kernels.lora_down, the GELU'd tile through shared memory",
            options={"gelu_operand": "smem"}),
    Variant("pallas_tk128", "pallas_kernels.lora_down, 128-column K tiles", options={"tile_k": 128}),
    Variant("pallas_tk128_1cta", "pallas_kernels.lora_down, 128-column K tiles, 1 CTA per SM, 6 stages",
            options={"tile_k": 128, "ctas_per_sm": 1, "max_concurrent_steps": 6}),
    Variant("pallas_deep_1cta", "pallas_kernels.lora_down, 1 CTA per SM, 8 stages",
            options={"ctas_per_sm": 1, "max_concurrent_steps": 8}),
    Variant("pallas_nosplit_deep", "pallas_kernels.lora_down, no K split, 128-column K tiles, 8 stages",
            options={"ctas_per_sm": None, "tile_k": 128, "max_concurrent_steps": 8}),
)
# name: M, x's columns, rank, GELU from (None: no prologue), tail (width, first column) or None
SITES = {
    "double to_qkv (img, r 3x32)": dict(m=4096, k=3072, rank=96, gelu_from=None, tail=None),
    "double to_out / ff.net.0 (img, r32)": dict(m=4096, k=3072, rank=32, gelu_from=None, tail=None),
    "double ff.net.2 GELU (img, r32)": dict(m=4096, k=12288, rank=32, gelu_from=0, tail=None),
    "single to_qkv_mlp (r 4x32)": dict(m=4608, k=3072, rank=128, gelu_from=None, tail=None),
    "single proj_out [attn, GELU(mlp)] (r32)": dict(m=4608, k=3072, rank=32, gelu_from=3072, tail=(21504, 9216)),
}


def read_bytes(d) -> int:
    width = d["k"] + (d["tail"][0] - d["tail"][1] if d["tail"] else 0)
    return 2 * d["m"] * width


def site_args(d):
    import jax
    import jax.numpy as jnp

    def make(i):
        ks = jax.random.split(jax.random.key(7000 + i), 4)
        x = jax.random.normal(ks[0], (d["m"], d["k"]), jnp.bfloat16)
        tail = None if d["tail"] is None else jax.random.normal(ks[1], (d["m"], d["tail"][0]), jnp.bfloat16)
        width = read_bytes(d) // (2 * d["m"])
        down = (jax.random.normal(ks[2], (d["rank"], width), jnp.float32) / width ** 0.5).astype(jnp.bfloat16)
        scale = jnp.full((d["rank"],), 0.8, jnp.float32)
        return jax.block_until_ready((x, tail, down, scale))
    return make


def work(variant: str, args) -> list[dict]:
    from pallas_kernels.lora_down import LoRADownConfig, lora_down
    from pallas_kernels.lora_down_reference import down_projection_reference

    def setup(d):
        kw = dict(gelu_from=d["gelu_from"], tail_from=d["tail"][1] if d["tail"] else 0)
        if variant == "xla":
            fn = lambda x, tail, down, s: down_projection_reference(x, down, s, tail=tail, **kw)  # noqa: E731
        else:
            cfg = LoRADownConfig(**VARIANTS[variant].options)
            fn = lambda x, tail, down, s: lora_down(x, down, s, tail=tail, config=cfg, **kw)  # noqa: E731
        return fn, site_args(d), d["m"] * d["rank"] * 2

    def metric(d, ms):
        return {"gbs": read_bytes(d) / (ms * 1e-3) / 1e9}

    return harness.time_grid(SITES, variant, setup, metric, deadline=args.deadline)


def markdown(log: dict) -> list[str]:
    rows = [dict(r, us=r["ms"] * 1e3) if "ms" in r else r for r in log.get("rows", [])]
    return ["# LoRA down-projection at FLUX.1-dev's LoRA'd layers (1024² b1)", "",
            "h = (u A^T) * s, bf16 out; device time (us), median of 20 over rotating inputs; `xla`: XLA's producer "
            "and GEMM as the fused model ran them before the kernel (baseline); ratios: xla time / this time.",
            f"GPU tests: {log.get('tests', 'not run')}", ""] + harness.pivot_table(rows, "us", "{:.1f}", baseline=BASELINE)


def summarize(rows: list[dict]) -> list[dict]:
    by = {(r["shape"], r["variant"]): r for r in rows if "ms" in r}
    return [harness.figure("LoRA down-projection kernel", f"{by[(s, 'pallas')]['ms'] * 1e3:.1f} us", shape=s,
                           baseline="XLA producer + GEMM", ratio=by[(s, BASELINE)]["ms"] / by[(s, "pallas")]["ms"])
            for s in SITES if (s, "pallas") in by and (s, BASELINE) in by]


def stage_tests(out_dir: Path, log: dict, args) -> None:
    log["tests"] = harness.run_pytest("tests/test_lora_down.py", args.tests_k)


def stage_bench(out_dir: Path, log: dict, args) -> None:
    """Each variant in its own process."""
    for v in args.variants:
        got = harness.run_isolated(harness.worker_command(MODULE, v, args.argv), timeout=args.variant_timeout, label=v)
        log.setdefault("rows", []).extend(harness.error_rows([v], got["error"], shape="all") if isinstance(got, dict)
                                          else got)


STAGES = {"tests": stage_tests, "bench": stage_bench}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = harness.stage_parser(__doc__, budget_s=300, tests_k="gpu")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    if args.worker:
        args.deadline = args.deadline or time.time() + args.budget_s
        harness.emit(work(args.worker, args))
        return
    harness.run_stage_bench(NAME, MODULE, STAGES, argv, args, markdown, lambda log: summarize(log.get("rows", [])))


if __name__ == "__main__":
    main()
