"""LoRA on the W4A4 FLUX.1-dev step: the fused path (the down-projection in the `lora_down` kernel,
the up-projection in the W4A4 GEMM's epilogue) and the unfused one (two XLA GEMMs after the layer).

Variants, timed on one random-weight W4A4 model (Pallas kernels, fused projections and the GELU
producers fused into the rotate-quantize kernel, as `FluxPipeline` builds it) in one process,
since a LoRA switch is measured on a live model:
  none          no LoRA (the baseline)
  r32           one rank-32 LoRA, fused (h from the `lora_down` kernel; XLA after a LayerNorm)
  r32_xladown   the same, fused, with h from XLA's producer + GEMM as before the kernel
                (`convrot_jax.set_lora_fusion(model, True, down_kernel=False)`)
  r32_unfused   the same LoRA with every branch unfused (`convrot_jax.set_lora_fusion(model, False)`)
  r16_r32_r64   three LoRAs at once, ranks 16, 32 and 64, fused
  k32           one rank-32 LoRA in kohya naming (fused qkv and linear1 modules: rank 32 on the fused
                layers, no block-diagonal B), fused
The r LoRAs are diffusers-named files (as ai-toolkit and diffusers' trainers write them) on every
W4A4 layer of every block: to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out, ff and ff_context of
the double blocks; to_q/k/v, proj_mlp and proj_out of the single blocks. On the fused layers q, k,
v (and the single blocks' MLP input) are separate LoRA modules, so a rank-r LoRA is a rank-3r
branch of to_qkv and 4r of to_qkv_mlp with block-diagonal B (flux_flax.lora).

A step is one transformer forward given its precomputed AdaLN modulation (as `sampling.denoise`
runs it), 512 T5 tokens; the jitted step takes the graph definition as a static argument and the
state (LoRA factors included) as input, as `FluxPipeline` does. Reported: step time (median of
--iters host-timed runs of the compiled step: without the per-call hashing of the static graph
definition, which the pipeline's one-program loop does not pay per step) and its ratio to `none`;
the switch: `read_lora` + `apply_loras` of another rank-32 file, then one step, with the step's
trace count showing no recompilation. `--breakdown`: each timed variant's per-stage device time and
launch count (`bench_e2e.step_breakdown`: where a LoRA's milliseconds go).

    PYTHONPATH=. python3 -m benchmarks.bench_lora
    JAX_PLATFORMS=cpu PYTHONPATH=. python3 -m benchmarks.bench_lora --config small --size 64 --iters 1 \\
        --warmup 0 --impl xla --out /tmp/lora                         # CPU smoke test
Writes benchmarks/results/lora.{md,json}.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.bench_e2e import breakdown_lines

NAME = "lora"
MODULE = "benchmarks.bench_lora"
TEXT_TOKENS = 512
# Variant -> the LoRA files loaded ("r32": rank 32, diffusers naming; "k32": rank 32, kohya naming).
VARIANTS = {"none": (), "r32": ("r32",), "r32_xladown": ("r32",), "r32_unfused": ("r32",),
            "r16_r32_r64": ("r16", "r32", "r64"), "k32": ("k32",)}
# Variants whose branches are not fused the default way: (fused, down_kernel) for set_lora_fusion.
FUSION = {"r32_unfused": (False, True), "r32_xladown": (True, False)}
DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
          "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
          "ff_context.net.2")
SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
KOHYA_DOUBLE = ("img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2",
                "txt_attn_qkv", "txt_attn_proj", "txt_mlp_0", "txt_mlp_2")
KOHYA_SINGLE = ("linear1", "linear2")


def lora_shapes(config, kohya: bool) -> dict[str, tuple[int, int]]:
    """{file module name: (in, out)} of a LoRA on every W4A4 layer of every block: diffusers names
    (q, k, v and the single blocks' MLP input separate) or kohya's (fused qkv, linear1)."""
    dim, mlp = config.inner_dim, 4 * config.inner_dim
    shapes = {}
    for i in range(config.num_layers):
        for name in KOHYA_DOUBLE if kohya else DOUBLE:
            k, n = ((mlp, dim) if name.endswith(("net.2", "mlp_2")) else (dim, mlp) if name.endswith(("net.0.proj", "mlp_0"))
                    else (dim, 3 * dim) if name.endswith("qkv") else (dim, dim))
            shapes[f"lora_unet_double_blocks_{i}_{name}" if kohya else f"transformer.transformer_blocks.{i}.{name}"] = (k, n)
    for i in range(config.num_single_layers):
        for name in KOHYA_SINGLE if kohya else SINGLE:
            k, n = ((dim + mlp, dim) if name in ("proj_out", "linear2") else (dim, mlp) if name == "proj_mlp"
                    else (dim, 3 * dim + mlp) if name == "linear1" else (dim, dim))
            shapes[f"lora_unet_single_blocks_{i}_{name}" if kohya else f"transformer.single_transformer_blocks.{i}.{name}"] = (k, n)
    return shapes


def write_lora_file(path: Path, config, rank: int, seed: int, kohya: bool = False) -> None:
    """A random LoRA of `rank` on every W4A4 layer of the FLUX transformer (bf16 factors)."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    down, up = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (k, n) in lora_shapes(config, kohya).items():
        tensors[module + down] = rng.standard_normal((rank, k), np.float32) / k ** 0.5
        tensors[module + up] = rng.standard_normal((n, rank), np.float32) * 0.01
    save_file({key: v.astype(ml_dtypes.bfloat16) for key, v in tensors.items()}, str(path))


def worker(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import flux_flax
    from convrot_jax.lora import LoRAParam, set_lora_fusion
    from flux_flax.lora import apply_loras, read_lora, remove_loras
    from flux_flax.random_weights import random_transformer

    from benchmarks.bench_e2e import step_breakdown

    config = {"dev": flux_flax.FluxConfig.dev, "small": flux_flax.FluxConfig.small,
              "tiny": flux_flax.FluxConfig.tiny}[args.config]()
    start = t0 = time.perf_counter()
    model = random_transformer(config, dtype=jnp.bfloat16, quantize=args.impl)
    flux_flax.fuse_producers(flux_flax.fuse_projections(model))  # as FluxPipeline: DEFAULT_KINDS
    print(f"model ready in {time.perf_counter() - t0:.0f} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_lora_"))

    def lora_file(key: str) -> Path:
        """The random LoRA file `key` ("r32": rank 32; "k32": the same in kohya naming; "r32_b":
        another seed), written when first asked for."""
        path = tmp / f"{key}.safetensors"
        if not path.is_file():
            t = time.perf_counter()
            write_lora_file(path, config, int(key[1:3]), seed=len(list(tmp.iterdir())), kohya=key[0] == "k")
            print(f"  {key}: written in {time.perf_counter() - t:.1f} s", flush=True)
        return path

    traces = [0]

    def forward(graphdef, state, inputs):
        traces[0] += 1  # runs at trace time only
        return nnx.merge(graphdef, state)(**inputs)

    step = jax.jit(forward, static_argnums=0)
    s = (args.size // 16) ** 2
    k = jax.random.split(jax.random.key(0), 3)
    batch = 1
    raw = dict(
        hidden_states=jax.random.normal(k[0], (batch, s, config.in_channels), jnp.bfloat16),
        encoder_hidden_states=jax.random.normal(k[1], (batch, TEXT_TOKENS, config.joint_attention_dim), jnp.bfloat16),
        pooled_projections=jax.random.normal(k[2], (batch, config.pooled_projection_dim), jnp.bfloat16),
        timestep=jnp.full((batch,), 0.5, jnp.bfloat16), img_ids=jnp.zeros((s, 3)), txt_ids=jnp.zeros((TEXT_TOKENS, 3)),
        guidance=jnp.full((batch,), 3.5, jnp.bfloat16),
    )
    inputs = dict(raw, modulation=jax.jit(lambda g, st, x: nnx.merge(g, st).modulation(
        x["timestep"], x["pooled_projections"], x["guidance"]), static_argnums=0)(*nnx.split(model), raw))

    def time_step(label: str) -> dict:
        graphdef, state = nnx.split(model)
        t = time.perf_counter()
        step(graphdef, state, inputs).block_until_ready()
        first = time.perf_counter() - t
        # Timed through the compiled program: a jitted call with the graph definition static hashes
        # it on every call (~10 ms of host time at FLUX.1-dev's 57 blocks), which the pipeline pays
        # once per generation (its loop is one program), not per step.
        compiled = step.lower(graphdef, state, inputs).compile()
        ms, loop = harness.step_times(lambda: compiled(state, inputs), iters=args.iters, warmup=args.warmup,
                                      sync=lambda y: y.block_until_ready())
        lora_mib = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, LoRAParam))) / 2**20
        print(f"  {label}: {ms:.1f} ms, loop {loop:.1f} ms (first call {first:.1f} s), LoRA factors {lora_mib:.0f} MiB",
              flush=True)
        row = dict(variant=label, size=args.size, batch=batch, step_ms=ms, loop_step_ms=loop, first_call_s=first,
                   lora_mib=lora_mib)
        if args.breakdown and jax.default_backend() == "gpu":
            row["breakdown"] = step_breakdown(jax.jit(functools.partial(forward, graphdef)), state, inputs)
        return row

    def switch() -> dict:
        """r32 is compiled: load another rank-32 file (other values, scale 0.8) in its place."""
        apply_loras(model, [(read_lora(lora_file("r32")), 1.0)])
        step(*nnx.split(model), inputs).block_until_ready()
        before = traces[0]
        other = lora_file("r32_b")
        t = time.perf_counter()
        apply_loras(model, [(read_lora(other), 0.8)])
        jax.block_until_ready(nnx.state(model, LoRAParam))
        load_s = time.perf_counter() - t
        step(*nnx.split(model), inputs).block_until_ready()
        switch_s = time.perf_counter() - t
        print(f"  switch: read+apply {load_s:.2f} s, + first step {switch_s:.2f} s, retraces {traces[0] - before}",
              flush=True)
        return dict(variant="switch_r32", size=args.size, batch=batch, load_s=load_s, switch_s=switch_s,
                    retraces=traces[0] - before)

    rows = []
    for name in args.variants:
        if name == "switch_r32":  # reuses r32's compilation: only after r32 ran
            ran = any(r["variant"] == "r32" and "step_ms" in r for r in rows)
            rows.append(switch() if ran else dict(variant=name, error="not run: needs r32 timed first"))
            continue
        if args.budget_s and time.perf_counter() - start > args.budget_s:
            rows.append(dict(variant=name, error=f"not run: past the {args.budget_s:.0f} s budget"))
            continue
        apply_loras(model, [(read_lora(lora_file(key)), 1.0) for key in VARIANTS[name]])
        fused, down_kernel = FUSION.get(name, (True, True))
        set_lora_fusion(model, fused, down_kernel=down_kernel)
        rows.append(time_step(name))
        harness.emit(rows)  # so far: kept by the parent if a later variant runs past the timeout
    remove_loras(model)
    return rows


def _runs(rows: list[dict]) -> dict[int, dict[str, dict]]:
    """{run: {variant: row}}: rows of one run (`run`, set by --merge; 0 otherwise) share a baseline."""
    out: dict[int, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r.get("run", 0), {})[r["variant"]] = r
    return out


def markdown(rows: list[dict], args) -> list[str]:
    runs = _runs(rows)
    lines = [f"# LoRA on the W4A4 FLUX.1-dev step ({args.config} config, {args.impl} W4A4)", "",
             "One transformer forward given its precomputed modulation, 512 text tokens, random weights, "
             "one process (same model); median of the timed runs. LoRAs on every W4A4 layer of every block: r* "
             "diffusers-named (q/k/v separate: rank 3r on to_qkv, 4r on to_qkv_mlp, block-diagonal B), k32 "
             "kohya-named (fused qkv and linear1 modules: rank 32 on each fused layer). LoRA branches fused into "
             "the W4A4 kernels (Pallas: h from the `lora_down` kernel, h B^T in the GEMM's epilogue), `*_xladown` "
             "with h from XLA's producer + GEMM, `*_unfused` not fused (two XLA GEMMs after the layer). `vs none`: "
             "against the step without LoRA of the same run (process). step ms: host clock around one synchronised "
             "call; loop ms: per call of --iters calls issued back to back with one synchronisation (the host's "
             "per-call work overlapped with the device's, as in the pipeline's loop of steps).", ""]

    def versus(r, base, key):
        return f"{100 * (r[key] / base[key] - 1):+.1f}%" if key in r and key in base else "-"

    body = []
    for run, by in runs.items():
        base = by.get("none", {})
        body += [[run, r["variant"], f"{r['size']}²", r["batch"], f"{r['step_ms']:.1f}", versus(r, base, "step_ms"),
                  f"{r['loop_step_ms']:.1f}" if "loop_step_ms" in r else "-", versus(r, base, "loop_step_ms"),
                  f"{r['lora_mib']:.0f}"]
                 for r in by.values() if "step_ms" in r]
        body += [[run, r["variant"], f"failed: {r['error']}", *[""] * 6] for r in by.values() if "error" in r]
    lines += harness.md_table(["run", "variant", "size", "batch", "step ms", "vs none", "loop ms", "loop vs none",
                               "LoRA factors MiB"], body, [True, False, True, True, True, True, True, True, True])
    for r in rows:
        if r.get("breakdown"):
            lines += breakdown_lines(r["variant"], r["step_ms"], r["breakdown"])
    for r in rows:
        if r.get("variant") == "switch_r32" and "load_s" in r:
            lines += ["", f"Switching to another rank-32 LoRA (scale 0.8) between generations: read + apply "
                      f"{r['load_s']:.2f} s, then the first step {r['switch_s'] - r['load_s']:.2f} s; "
                      f"recompilations: {r['retraces']}."]
    return lines


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for by in _runs(rows).values():
        base = by.get("none")
        if not base or "step_ms" not in base:
            continue
        for name, r in by.items():
            if name == "none" or "step_ms" not in r:
                continue
            key = harness.compared_step_key(r, base)
            if key == "loop_step_ms":
                text = (f"{r['loop_step_ms']:.1f} ms per loop step (baseline {base['loop_step_ms']:.1f} ms); "
                        f"synchronised call {r['step_ms']:.1f} ms (baseline {base['step_ms']:.1f} ms)")
            else:
                text = f"{r['step_ms']:.1f} ms per step (baseline {base['step_ms']:.1f} ms)"
            out.append(harness.figure(f"FLUX.1-dev W4A4 step with LoRA ({name})", text,
                                      shape=f"{r['size']}² b{r['batch']}", baseline="the same step without LoRA",
                                      ratio=base[key] / r[key]))
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = harness.argument_parser(__doc__)
    parser.add_argument("--variants", nargs="+",
                        default=["none", "r32", "r32_xladown", "r32_unfused", "switch_r32", "r16_r32_r64", "k32"],
                        choices=[*VARIANTS, "switch_r32"], help="run in this order (put switch_r32 after r32)")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--breakdown", action="store_true",
                        help="CUPTI per-stage device time and launches of each timed variant's step (GPU; a compile each)")
    parser.add_argument("--impl", choices=["pallas", "xla", "auto"], default="pallas", help="the W4A4 layers' ops")
    parser.add_argument("--config", choices=["dev", "small", "tiny"], default="dev", help="small / tiny: CPU smoke tests")
    parser.add_argument("--out", type=Path, default=harness.RESULTS)
    parser.add_argument("--timeout", type=float, default=None, help="seconds the worker process may run")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no variant after this many seconds of the worker (each costs a compilation)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="LORA_JSON",
                        help="only merge lora.json files of runs over variant subsets (same machine) into one table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        harness.emit(worker(args))
        return
    if args.merge:
        rows = [dict(row, run=i) for i, path in enumerate(args.merge) for row in harness.load_results(path)["rows"]]
        _, meta = harness.merge_runs(args.merge)
        harness.write_results(NAME, {"rows": rows}, markdown(rows, args), args.out, summary=summarize(rows), meta=meta,
                              command="python -m " + MODULE + " " + " ".join(argv))
        print((args.out / f"{NAME}.md").read_text())
        return
    got = harness.run_isolated(harness.worker_command(MODULE, "all", argv), timeout=args.timeout, label=NAME)
    if isinstance(got, dict):  # the worker failed: what it finished, then an error row per variant it did not
        done = got.get("partial", [])
        rows = done + harness.error_rows([v for v in args.variants if v not in {r["variant"] for r in done}],
                                         got["error"])
    else:
        rows = got
    harness.write_results(NAME, {"rows": rows}, markdown(rows, args), args.out, summary=summarize(rows),
                          meta=harness.run_meta(probe=True), command="python -m " + MODULE + " " + " ".join(argv))
    print((args.out / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
