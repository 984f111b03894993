"""Named real-world shapes shared by the tests and the benchmarks (tokamax's arg_specs idea).

FLUX.1 token linears (DESIGN.md §2): M tokens x K in_features x N out_features.
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
# Token counts: 512 text tokens; 1024 + 512 (512²); 4096 + 512 (1024²); batch 2 at 1024².
FLUX_TOKEN_COUNTS: tuple[int, ...] = (512, 1536, 4608, 9216)
