"""The W4A16 GEMM's block configuration and its defaults.

`config_for(m, n, k, scale_group)` picks the tiles from the problem (no tuning table yet:
benchmarks/results/w4a16_matmul.md); any config can be passed to the kernel explicitly.
"""

from __future__ import annotations

import dataclasses

# Shared memory the pipeline's stage ring may take (of the H100/H200's 227 KiB a block).
_SMEM_BUDGET = 192 * 1024
_MAX_STAGES = 8


@dataclasses.dataclass(frozen=True)
class W4A16MatmulConfig:
    """Block sizes. The CTA computes a (tile_m, 2 * tile_n) output tile, one tile_n-wide half per
    compute warpgroup (wgmma's M side: the weight rows); K advances tile_k a pipeline step. tile_m
    is wgmma's N side (the tokens), so it can be as small as 8."""

    tile_m: int = 64
    tile_n: int = 64
    tile_k: int = 256
    max_concurrent_steps: int = 4

    def __post_init__(self):
        if self.tile_m % 8 or not 8 <= self.tile_m <= 256:
            raise ValueError(f"tile_m must be a multiple of 8 in [8, 256]: {self}")
        if self.tile_n % 64 or self.tile_k % 64:
            raise ValueError(f"tile_n and tile_k must be multiples of 64: {self}")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps must be at least 2: {self}")

    @property
    def stage_bytes(self) -> int:
        """Shared memory of one pipeline stage: the bf16 activation tile and the packed weights."""
        return self.tile_m * self.tile_k * 2 + 2 * self.tile_n * self.tile_k // 2


def config_for(m: int, n: int, k: int, scale_group: int | None = None) -> W4A16MatmulConfig:
    """The default config: tile_m = M rounded up to 8 (at most 128: small M is one m tile, so the
    tensor cores do no padded work and the weight is read once), tile_k = 256 (scale_group with
    per-group scales; 128 from tile_m = 128, so that 4 stages fit), and as many stages as fit in
    shared memory."""
    del n, k
    tile_m = min(-(-max(m, 1) // 8) * 8, 128)
    tile_k = scale_group if scale_group is not None else (256 if tile_m <= 64 else 128)
    cfg = W4A16MatmulConfig(tile_m=tile_m, tile_k=tile_k)
    stages = max(2, min(_MAX_STAGES, _SMEM_BUDGET // cfg.stage_bytes))
    return dataclasses.replace(cfg, max_concurrent_steps=stages)
