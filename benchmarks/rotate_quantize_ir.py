"""Count what Triton makes of the rotate-quantize kernel for sm_90, on a machine without a GPU.

    python benchmarks/rotate_quantize_ir.py --k 3072 15360 --groups-per-tile 4 16 [--no-swap-halves]

jax lowers the Pallas Triton kernel to TTIR in Python; this script does that for an H100 target
(jax normally asks the GPU for its compute capability), then compiles the TTIR with the pip
`triton` package (the CPU venv has it as a torch dependency) to TTGIR and PTX, and counts the
layout conversions, shared-memory traffic and barriers per row: the register shuffles that bound
the kernel (benchmarks/notes/rotate_quantize.md). A proxy: XLA compiles the kernel with its own
bundled Triton, whose passes may differ; timings come from bench_rotate_quantize.py on the GPU.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import tempfile

import jax
import jax.numpy as jnp


def kernel_ttir(k: int, config, m: int = 4608) -> str:
    """The TTIR text of rotate_quantize on an (m, k) bf16 input, lowered for an H100."""
    from jax._src.pallas.triton import gpu_info, lowering
    from jax._src.pallas.triton import pallas_call_registration as registration

    from pallas_kernels.rotate_quantize import rotate_quantize

    modules = []
    lower = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm())
        return result

    h100 = gpu_info.GpuInfo(gpu_version=gpu_info.GpuVersion.H100, arch_name="sm_90", compute_capability=90)
    saved = registration.gpu_info_lib.get_gpu_info, registration.lowering.lower_jaxpr_to_triton_module
    registration.gpu_info_lib.get_gpu_info = lambda *_, **__: h100
    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        f = jax.jit(functools.partial(rotate_quantize, config=config))
        f.trace(jax.ShapeDtypeStruct((m, k), jnp.bfloat16)).lower(lowering_platforms=("cuda",))
    finally:
        registration.gpu_info_lib.get_gpu_info, registration.lowering.lower_jaxpr_to_triton_module = saved
    return modules[0]


def counts(ttir: str, num_warps: int) -> dict[str, int]:
    """Compile TTIR to TTGIR and PTX for sm_90 and count the shuffle-related operations."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.NamedTemporaryFile("w", suffix=".ttir", delete=False) as f:
        f.write(ttir)
    try:
        compiled = triton.compile(f.name, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": 1})
    finally:
        os.unlink(f.name)
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    return {
        "convert_layout": len(re.findall(r"ttg\.convert_layout", ttgir)),
        "st.shared": len(re.findall(r"st\.shared", ptx)),
        "ld.shared": len(re.findall(r"ld\.shared", ptx)),
        "bar.sync": len(re.findall(r"bar\.sync", ptx)),
        "ptx_lines": ptx.count("\n"),
    }


def main() -> None:
    from pallas_kernels.rotate_quantize import RotateQuantizeConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--k", type=int, nargs="+", default=[3072, 15360])
    p.add_argument("--groups-per-tile", type=int, nargs="+", default=[4, 16])
    p.add_argument("--num-warps", type=int, default=4)
    p.add_argument("--swap-halves", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    for k in args.k:
        for gpt in args.groups_per_tile:
            cfg = RotateQuantizeConfig(groups_per_tile=gpt, num_warps=args.num_warps, swap_halves=args.swap_halves)
            c = counts(kernel_ttir(k, cfg), args.num_warps)
            per_elem = c["ptx_lines"] / (k / (32 * args.num_warps))
            print(f"K={k:5d} groups_per_tile={gpt:2d} warps={args.num_warps} swap_halves={args.swap_halves}: "
                  + "  ".join(f"{n} {v}" for n, v in c.items()) + f"  (~{per_elem:.0f} PTX lines per element a thread holds)")


if __name__ == "__main__":
    main()
