"""Which layers get which treatment: an ordered list of (path regex -> treatment), as data.

Paths are a model's dotted module paths (e.g. "blocks.3.attn.to_q"); the first rule whose regex
matches the whole path wins; unmatched layers get the default. Model presets live with their
models (FLUX's: `flux_flax.flux_default_policy`).
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
    def from_json(cls, text: str, source: str = "policy") -> "QuantPolicy":
        """Parses a JSON policy: {"rules": [["regex", "w4a4"], ...], "default": "bf16"}; errors name `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a policy is a JSON object with 'rules', got {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "QuantPolicy":
        """Reads a UTF-8 JSON policy file (see `from_json`); errors name the file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"policy file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
        except OSError as e:
            raise ValueError(f"cannot read policy file {path}: {e}") from None
        return cls.from_json(text, source=f"policy file {path}")
