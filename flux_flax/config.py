"""`FluxConfig`: the FLUX.1 transformer's hyper-parameters, named as in diffusers' `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

from flux_flax.errors import NotAFluxCheckpointError

# diffusers hard-codes these in FluxTransformer2DModel; they are not config fields there.
ROPE_THETA = 10000
MLP_RATIO = 4.0
TRANSFORMER_CLASS_NAME = "FluxTransformer2DModel"


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """FLUX.1 transformer shape. Field names and defaults are diffusers' `FluxTransformer2DModel`
    config (`transformer/config.json`), so a diffusers config dict maps onto it one to one."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"every RoPE axis dimension must be even, got {self.axes_dims_rope}")

    # Derived sizes, as diffusers computes them.
    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * MLP_RATIO)

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.in_channels

    # Presets.
    @classmethod
    def dev(cls, **overrides: Any) -> "FluxConfig":
        """FLUX.1-dev: 19 double + 38 single blocks, 24 heads of 128, guidance embedding on."""
        return dataclasses.replace(cls(guidance_embeds=True), **overrides)

    @classmethod
    def schnell(cls, **overrides: Any) -> "FluxConfig":
        """FLUX.1-schnell: as dev without the guidance embedding."""
        return dataclasses.replace(cls(guidance_embeds=False), **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "FluxConfig":
        """diffusers' own test size: in_channels 4, 1 double + 1 single block, 2 heads of 16
        (hidden 32), joint/pooled dims 32, RoPE axes (4, 4, 8). Guidance on unless overridden."""
        base = cls(
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def small(cls, **overrides: Any) -> "FluxConfig":
        """A small model for quantized tests: every quantized layer's K is a multiple of 256
        (hidden 2 x 128 = 256, MLP 1024, single-block proj_out K = 1280), real head size and RoPE
        axes (16, 56, 56), in_channels 64, 2 double + 2 single blocks, guidance on."""
        base = cls(
            in_channels=64,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=128,
            num_attention_heads=2,
            joint_attention_dim=256,
            pooled_projection_dim=256,
            guidance_embeds=True,
        )
        return dataclasses.replace(base, **overrides)

    # (De)serialisation.
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (lists for tuples), the inverse of `from_dict`."""
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FluxConfig":
        """Strict inverse of `to_dict`: unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown FluxConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def from_diffusers_config(cls, data: dict[str, Any]) -> "FluxConfig":
        """From diffusers' transformer `config.json`. Keys starting with '_' (class name, version)
        are metadata; a `_class_name` other than FluxTransformer2DModel, or an unknown field, is
        refused, since the model would not be a FLUX.1 transformer this port can run."""
        class_name = data.get("_class_name", TRANSFORMER_CLASS_NAME)
        if class_name != TRANSFORMER_CLASS_NAME:
            raise NotAFluxCheckpointError(f"config is for {class_name!r}, not {TRANSFORMER_CLASS_NAME!r}")
        return cls.from_dict({k: v for k, v in data.items() if not k.startswith("_")})
