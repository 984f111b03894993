"""The FLUX.1 linear shapes used to tune and test the kernels (tokamax's arg_specs idea).

M tokens x K in_features x N out_features (docs/design.md); the shipped GEMM tuning table
(`w4a4_matmul_configs.json`) is keyed on them. The tests and benchmarks/ both import them.
"""

from __future__ import annotations

# (K, N) of FLUX.1's W4A4 linears, hidden 3072.
FLUX_LINEAR_SHAPES: dict[str, tuple[int, int]] = {
    "attn_qkv_out (3072x3072)": (3072, 3072),
    "single_qkv (3072x9216)": (3072, 9216),
    "mlp_up (3072x12288)": (3072, 12288),
    "mlp_down (12288x3072)": (12288, 3072),
    "single_proj_out (15360x3072)": (15360, 3072),
}
# Token counts M: 512 text tokens; 1024 + 512 (512²); 4096 + 512 (1024²); batch 2 at 1024².
FLUX_TOKEN_COUNTS: tuple[int, ...] = (512, 1536, 4608, 9216)
