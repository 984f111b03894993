"""The W4A4 step's fusions switched on one at a time, in one process on one model.

Each fusion of the FLUX.1-dev W4A4 step (issue: the step beyond the GEMM) is a switch on the
model (`flux_flax.fuse_producers`, `flux_flax.fuse_gated_residuals`, `flux_flax.set_attention`'s
`qk_producer`: the cuDNN attention's q, k, v from one producer kernel), so one random model,
quantized once, can be timed with each set of fusions: the differences are the fusions' alone
(same weights, same process, same GPU state), and the baseline (no fusion beyond the fused
projections) is measured in the same run. A step is one transformer forward given its
precomputed AdaLN modulation, as `sampling.denoise` runs it; median of --iters after warm-up,
host clock around a synchronised call (the host's ~11 ms of work before the device starts
included: `benchmarks/step_trace.py`). With --breakdown the last
configuration and the first (the baseline) are also broken down per stage from CUPTI
(`bench_e2e.step_breakdown`). The results are written after every configuration.

    PYTHONPATH=. python3 -m benchmarks.bench_fusions --size 1024
    PYTHONPATH=. JAX_PLATFORMS=cpu python3 -m benchmarks.bench_fusions --config small --size 64 --impl xla \\
        --iters 1 --warmup 0 --out /tmp/fusions                                   # CPU smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import harness, step_trace
from benchmarks.bench_e2e import breakdown_lines

NAME = "fusions"
# (label, producer kinds fused into the quantizer, gated residuals in the GEMM epilogue, the attention's
# q, k, v from the producer kernel), in order.
CONFIGS: tuple[tuple[str, tuple[str, ...], bool, bool], ...] = (
    ("none", (), False, False),
    ("gelu", ("gelu",), False, False),
    ("gelu+qk_producer", ("gelu",), False, True),
    ("gelu + epilogue", ("gelu",), True, False),
    ("gelu+qk_producer + epilogue", ("gelu",), True, True),
    ("gelu + layernorm + epilogue", ("gelu", "layernorm"), True, False),
)


def run(args: argparse.Namespace, save) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import flux_flax
    from benchmarks.bench_e2e import step_breakdown, step_inputs
    from flux_flax.random_weights import random_transformer

    config = {"dev": flux_flax.FluxConfig.dev, "small": flux_flax.FluxConfig.small}[args.config]()
    t0 = time.perf_counter()
    model = random_transformer(config, dtype=jnp.bfloat16)
    flux_flax.quantize_model(model, implementation=args.impl)
    flux_flax.fuse_projections(model)
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)

    inputs = step_inputs(config, args.size, args.batch)
    inputs["modulation"] = model.modulation(inputs["timestep"], inputs["pooled_projections"], inputs["guidance"])
    rows, ref = [], None
    configs = [c for c in CONFIGS if c[0] in args.configs]
    for i, (label, producers, epilogue, qk_producer) in enumerate(configs):
        flux_flax.fuse_gated_residuals(flux_flax.fuse_producers(model, producers), epilogue)
        flux_flax.set_attention(model, None, qk_producer=qk_producer)
        graphdef, state = nnx.split(model)
        step = jax.jit(lambda state, inputs, graphdef=graphdef: nnx.merge(graphdef, state)(**inputs))
        t0 = time.perf_counter()
        compiled = step.lower(state, inputs).compile()
        compile_s = time.perf_counter() - t0
        out = compiled(state, inputs)
        ms, loop = harness.step_times(lambda: compiled(state, inputs), iters=args.iters, warmup=args.warmup,
                                      sync=lambda y: y.block_until_ready())
        row = dict(fusions=label, size=args.size, batch=args.batch, step_ms=ms, loop_step_ms=loop, compile_s=compile_s,
                   finite=bool(jnp.isfinite(out.astype(jnp.float32)).all()))
        if ref is not None:  # the output moves only by rounding: how far from the first configuration's
            row["rel_l2_vs_first"] = float(jnp.linalg.norm((out - ref).astype(jnp.float32))
                                          / jnp.linalg.norm(ref.astype(jnp.float32)))
        if args.breakdown and i in (0, len(configs) - 1) and jax.default_backend() == "gpu":
            row["breakdown"] = step_breakdown(step, state, inputs)
        if args.trace:
            traced = {"graphs_on": compiled}
            if args.trace_graphs_off:  # a second compilation, with XLA's command buffers off
                traced["graphs_off"] = step.lower(state, inputs).compile(
                    compiler_options={"xla_gpu_enable_command_buffer": ""})
            for name, program in traced.items():
                path = step_trace.capture(lambda program=program: program(state, inputs).block_until_ready(),
                                          args.trace / f"{label.replace(' ', '').replace('+', '_')}.{name}.xplane.pb")
                print(f"  trace of {label}, {name}: {path}", flush=True)
        print(f"  {label}: {ms:.2f} ms, loop {loop:.2f} ms (compile {compile_s:.0f} s)", flush=True)
        if ref is None:
            ref = out
        rows.append(row)
        save(rows)
    return rows


def markdown(rows: list[dict]) -> list[str]:
    first = rows[0] if rows else {}

    def versus(r, key):
        return f"{first[key] / r[key]:.3f}x" if key in r and key in first else "-"

    lines = ["# The W4A4 step's fusions, one at a time", "",
             "FLUX.1-dev W4A4 (Pallas kernels, fused projections), random weights, 512 text tokens, the step "
             "given its precomputed modulation; one model in one process with each set of fusions switched on "
             "(`flux_flax.fuse_producers`, `flux_flax.fuse_gated_residuals`, "
             "`flux_flax.set_attention(..., qk_producer=)`). Ratio: the first row's step time / "
             "this one's, same run (higher is faster). rel L2: of the output against the first row's (the "
             "fusions change rounding only). step ms: one synchronised call; loop ms: per call of --iters calls issued "
             "back to back with one synchronisation (as a loop of steps runs them).", ""]
    lines += harness.md_table(
        ["fusions", "size", "batch", "step ms", f"vs {rows[0]['fusions']}", "loop ms", f"loop vs {rows[0]['fusions']}",
         f"rel L2 vs {rows[0]['fusions']}", "compile s"],
        [[r["fusions"], f"{r['size']}²", r["batch"], f"{r['step_ms']:.2f}", versus(r, "step_ms"),
          f"{r['loop_step_ms']:.2f}" if "loop_step_ms" in r else "-", versus(r, "loop_step_ms"),
          f"{r['rel_l2_vs_first']:.1e}" if "rel_l2_vs_first" in r else "-", f"{r['compile_s']:.0f}"] for r in rows],
        [False, True, True, True, True, True, True, True, True])
    for r in rows:
        if r.get("breakdown"):
            lines += breakdown_lines(r["fusions"], r["step_ms"], r["breakdown"])
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--impl", choices=["pallas", "xla"], default="pallas")
    parser.add_argument("--config", choices=["dev", "small"], default="dev", help="small: a CPU smoke test")
    parser.add_argument("--configs", nargs="+", choices=[c[0] for c in CONFIGS], default=[c[0] for c in CONFIGS],
                        metavar="LABEL", help=f"which fusion sets, in this order: {[c[0] for c in CONFIGS]}")
    parser.add_argument("--breakdown", action="store_true", help="CUPTI breakdown of the first and last configurations")
    parser.add_argument("--trace", type=Path, default=None, metavar="DIR",
                        help="write the XLA profiler timeline (xplane) of 3 steps of each configuration as "
                             "DIR/LABEL.graphs_on.xplane.pb (`benchmarks.step_trace` reads it: timeline and "
                             "per-kind kernel time)")
    parser.add_argument("--trace-graphs-off", action="store_true",
                        help="with --trace, also the step compiled with XLA's command buffers off "
                             "(DIR/LABEL.graphs_off.xplane.pb; a second compilation)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    args = parser.parse_args(argv)

    def save(rows: list[dict]) -> None:
        harness.write_results(NAME, {"rows": rows}, markdown(rows), args.out,
                              summary=[harness.figure(f"FLUX.1-dev W4A4 step, fusions: {rows[-1]['fusions']}",
                                                      f"{rows[-1]['step_ms']:.1f} ms", shape=f"{args.size}² b{args.batch}",
                                                      baseline=f"fusions: {rows[0]['fusions']}",
                                                      ratio=rows[0]["step_ms"] / rows[-1]["step_ms"])],
                              command="python -m benchmarks.bench_fusions " + " ".join(argv))

    run(args, save)
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
