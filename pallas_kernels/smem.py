"""Shared-memory layout every Mosaic GPU kernel here uses: (8, swizzle) tiling and the widest
swizzle a row allows, so that TMA copies and wgmma operands agree on one layout."""

from __future__ import annotations

import jax.experimental.pallas.mosaic_gpu as plgpu


def swizzle_transforms(minor_elems: int, itemsize: int = 1) -> tuple:
    """Shared-memory tiling + the widest swizzle for rows of `minor_elems` elements."""
    swizzle = plgpu.find_swizzle(minor_elems * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))

