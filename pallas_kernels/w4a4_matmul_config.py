"""The W4A4 GEMM's block configuration and its shipped tuning table.

`config_for(m, n, k)` picks a config from `w4a4_matmul_configs.json` (tuned on an H100 over the
FLUX shapes of `pallas_kernels.shapes`; benchmarks/results/w4a4_matmul.md); any config can be
passed to the kernel explicitly.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

_CONFIG_FILE = pathlib.Path(__file__).with_name("w4a4_matmul_configs.json")


@dataclasses.dataclass(frozen=True)
class W4A4MatmulConfig:
    """Block sizes. The CTA computes a (tile_m, 2 * tile_n) output tile, one tile_n-wide half per
    compute warpgroup; K advances tile_k codes (tile_k / 2 packed bytes) a pipeline step."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    max_concurrent_steps: int = 4
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    grid_minor_dim: str = "n"  # the planar-snake order's banded dimension, "m" or "n" (`tile_coords`)
    grid_tile_width: int = 1  # planar-snake band width of the persistent tile order
    # "smem": unpacked weights go through a shared-memory slot, wgmma(x_smem, w8_smem.T), acc (M, N).
    # "registers": unpacked weights stay in registers as wgmma's A operand, wgmma(w8, x_smem.T), acc
    # (N, M), stored transposed into the output tile (stmatrix .trans).
    weight_operand: str = "smem"
    # Split the tiles of the last, partial wave along K over the SMs the wave leaves idle
    # (`pallas_kernels.tile_schedule`); their int32 partial sums are added and dequantized after
    # the kernel.
    split_tail: bool = True
    # LoRA (`lora_h`, `lora_up`): rank columns per epilogue MMA chunk. Shared memory holds one
    # chunk of the CTA's h tile (tile_m, chunk) and of each warpgroup's B tile (tile_n, chunk): the
    # first is loaded while the main loop runs, further chunks one after another in the epilogue.
    # The rank is padded with zero columns to a multiple of it; the pipeline loses stages when the
    # slots would not fit beside it (`_stages_that_fit`).
    lora_chunk: int = 32

    def __post_init__(self):
        if self.tile_m % 64 or self.tile_n % 64 or self.tile_k % 64:
            raise ValueError(f"tile_m, tile_n, tile_k must be multiples of 64: {self}")
        if self.tile_m % self.epi_tile_m or self.tile_n % self.epi_tile_n:
            raise ValueError(f"epilogue tiles must divide the output tile: {self}")
        if self.grid_minor_dim not in ("m", "n"):
            raise ValueError(f"grid_minor_dim must be 'm' or 'n': {self}")
        if self.lora_chunk % 16 or self.lora_chunk < 16:
            raise ValueError(f"lora_chunk must be a positive multiple of 16 (a bf16 wgmma's K step): {self}")
        if self.weight_operand not in ("smem", "registers"):
            raise ValueError(f"weight_operand must be 'smem' or 'registers': {self}")


def _load_config_table() -> list[dict]:
    """The rows of the shipped tuning table (none when the file is missing)."""
    if not _CONFIG_FILE.exists():
        return []
    return json.loads(_CONFIG_FILE.read_text())["configs"]


def config_for(m: int, n: int, k: int, scale_group: int | None = None) -> W4A4MatmulConfig:
    """The shipped config for this problem: the table row with the largest `min_m` <= m whose
    (n, k) match, else a row with n = k = null (any shape), else the default. Per-group scales
    take the smem form with tile_k = scale_group and tile_m = 64 (room for the second, f32
    accumulator)."""
    best = None
    for row in _load_config_table():
        if row["min_m"] > m or (row["n"], row["k"]) not in ((n, k), (None, None)):
            continue
        key = (row["n"] is not None, row["min_m"])
        if best is None or key > best[0]:
            best = (key, row)
    cfg = W4A4MatmulConfig(**best[1]["config"]) if best else W4A4MatmulConfig()
    if scale_group is not None:  # the smem form, as verified on the GPU; 64 x 256 CTA tiles by default
        tile_n = cfg.tile_n if cfg.weight_operand == "smem" else 128
        cfg = dataclasses.replace(cfg, tile_m=64, tile_n=tile_n, tile_k=scale_group, epi_tile_m=64,
                                  weight_operand="smem")
    return cfg
