"""Which layers get which treatment: an ordered list of (path regex -> treatment), as data.

Paths are dotted module paths in diffusers' names (e.g. "transformer_blocks.3.attn.to_q"); the
first rule whose regex matches the whole path wins; unmatched layers keep their float weights.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

TREATMENTS: tuple[str, ...] = ("w4a4", "w4a16", "bf16")


@dataclasses.dataclass(frozen=True)
class QuantPolicy:
    rules: tuple[tuple[str, str], ...]
    default: str = "bf16"

    def __post_init__(self):
        for pattern, treatment in (*self.rules, ("<default>", self.default)):
            if treatment not in TREATMENTS:
                raise ValueError(f"policy rule {pattern!r}: treatment must be one of {TREATMENTS}, got {treatment!r}")
            if pattern != "<default>":
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"policy rule {pattern!r} is not a valid regex: {e}") from None

    def treatment(self, path: str) -> str:
        """The treatment of the layer at `path` (dotted, diffusers names)."""
        for pattern, treatment in self.rules:
            if re.fullmatch(pattern, path):
                return treatment
        return self.default

    @classmethod
    def flux_default(cls) -> "QuantPolicy":
        """DESIGN.md §3: token linears W4A4, AdaLN modulation W4A16, embedders and the final
        projection bf16. The fused projections (flux_flax.fusion: to_qkv, to_added_qkv,
        to_qkv_mlp) are W4A4 like the layers they join, for a model fused before quantizing."""
        return cls(
            rules=(
                (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
                 r"|to_qkv|to_added_qkv)", "w4a4"),
                (r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)", "w4a4"),
                (r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_qkv)|proj_mlp|proj_out|to_qkv_mlp)", "w4a4"),
                (r"(transformer_blocks|single_transformer_blocks)\.\d+\.(norm1|norm1_context|norm)\.linear", "w4a16"),
                (r"norm_out\.linear", "w4a16"),
            ),
            default="bf16",
        )

    def to_dict(self) -> dict:
        return {"rules": [list(r) for r in self.rules], "default": self.default}

    @classmethod
    def from_dict(cls, data: dict) -> "QuantPolicy":
        try:
            rules = tuple((str(p), str(t)) for p, t in data["rules"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a policy needs 'rules': a list of [regex, treatment] pairs ({e})") from None
        return cls(rules=rules, default=data.get("default", "bf16"))

    @classmethod
    def from_file(cls, path: str | Path) -> "QuantPolicy":
        """Reads a JSON policy: {"rules": [["regex", "w4a4"], ...], "default": "bf16"}."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read policy file {path}: {e}") from None
        return cls.from_dict(data)
