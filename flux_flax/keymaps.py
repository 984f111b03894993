"""The black-forest-labs (`flux1-dev.safetensors`) -> diffusers key map for the FLUX.1 transformer,
as diffusers' `convert_flux_transformer_checkpoint_to_diffusers` (loaders/single_file_utils.py):

- fused `qkv` projections split in three equal row blocks (q, k, v);
- single-block `linear1` split into rows (hidden, hidden, hidden, rest): q, k, v, proj_mlp;
- `final_layer.adaLN_modulation.1` halves swapped (bfl stores shift, scale; diffusers scale, shift);
- RMSNorm `scale` -> `weight`; an optional "model.diffusion_model." prefix is dropped.

The map is lazy: `bfl_to_diffusers` says where each diffusers tensor lives (a bfl key and a row
range), so a reader can fetch one tensor at a time. `diffusers_to_bfl` is the inverse, used to
write test fixtures in the bfl layout. LoRA files name modules the same ways
(`bfl_module_to_diffusers`, `split_rows`, `swaps_halves`), kohya's with underscores (`kohya_to_bfl`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import numpy as np

BFL_PREFIX = "model.diffusion_model."

# bfl module -> diffusers module(s), outside the blocks.
_GLOBAL: dict[str, str] = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # halves swapped
}
_SWAPPED = {"final_layer.adaLN_modulation.1"}

# Inside double_blocks.N (-> transformer_blocks.N). Tuples are fused tensors split by rows.
_DOUBLE: dict[str, str | tuple[str, ...]] = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}

# Inside single_blocks.N (-> single_transformer_blocks.N). linear1 = [q; k; v; mlp].
_SINGLE: dict[str, str | tuple[str, ...]] = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}

_PARAM = {"weight": "weight", "bias": "bias", "scale": "weight"}
_BLOCK_RE = re.compile(r"(double_blocks|single_blocks)\.(\d+)\.(.+)")


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """Where a diffusers tensor lives in a bfl file: rows [start, stop) of `key` along axis 0
    (None: the whole tensor), with its two halves swapped if `swap_halves`."""

    key: str
    start: int | None = None
    stop: int | None = None
    swap_halves: bool = False

    def shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.start is None:
            return tuple(source_shape)
        return (self.stop - self.start, *source_shape[1:])


def is_bfl(keys) -> bool:
    """Whether these keys are a black-forest-labs FLUX transformer (with or without the prefix)."""
    keys = {k.removeprefix(BFL_PREFIX) for k in keys}
    return "img_in.weight" in keys and any(k.startswith("double_blocks.") for k in keys)


def bfl_module_to_diffusers(module: str) -> str | tuple[str, ...] | None:
    """A bfl module ("double_blocks.3.img_attn.qkv", no prefix) -> its diffusers module, or the
    diffusers modules its rows split into, in order (fused qkv, linear1: `split_rows`); None when
    the FLUX transformer has no such module."""
    match = _BLOCK_RE.fullmatch(module)
    if not match:
        return _GLOBAL.get(module)
    kind, index, inner = match.groups()
    table, prefix = (_DOUBLE, "transformer_blocks") if kind == "double_blocks" else (_SINGLE, "single_transformer_blocks")
    target = table.get(inner)
    if target is None:
        return None
    return f"{prefix}.{index}.{target}" if isinstance(target, str) else tuple(f"{prefix}.{index}.{t}" for t in target)


def swaps_halves(module: str) -> bool:
    """Whether this bfl module's output rows are diffusers' with the two halves swapped."""
    return module in _SWAPPED


# kohya / sd-scripts spell a bfl module with underscores ("double_blocks_0_img_attn_qkv").
_KOHYA_BLOCK_RE = re.compile(r"(double_blocks|single_blocks)_(\d+)_(.+)")
_KOHYA_INNER = {kind: {name.replace(".", "_"): name for name in table}
                for kind, table in (("double_blocks", _DOUBLE), ("single_blocks", _SINGLE))}
_KOHYA_GLOBAL = {name.replace(".", "_"): name for name in _GLOBAL}


def kohya_to_bfl(name: str) -> str | None:
    """A kohya module name without its "lora_unet_" prefix -> the bfl module it spells
    ("double_blocks_0_img_attn_qkv" -> "double_blocks.0.img_attn.qkv"), or None."""
    match = _KOHYA_BLOCK_RE.fullmatch(name)
    if not match:
        return _KOHYA_GLOBAL.get(name)
    kind, index, inner = match.groups()
    inner = _KOHYA_INNER[kind].get(inner)
    return None if inner is None else f"{kind}.{index}.{inner}"


def split_rows(rows: int, parts: int, hidden: int) -> list[tuple[int, int]]:
    """Row ranges of a fused tensor: qkv in three equal parts; linear1 as (hidden,)*3 + rest."""
    sizes = [rows // 3] * 3 if parts == 3 else [hidden, hidden, hidden, rows - 3 * hidden]
    bounds = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def bfl_to_diffusers(shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, TensorSource], list[str]]:
    """Maps a bfl file's {key: shape} to {diffusers key: TensorSource}. Returns the map and the
    bfl keys it has no place for (the caller reports them as unexpected). The hidden size for
    splitting `linear1` is read from `img_in.weight`."""
    hidden = None
    for k, shape in shapes.items():
        if k.removeprefix(BFL_PREFIX) == "img_in.weight":
            hidden = shape[0]
    if hidden is None:
        raise KeyError("img_in.weight")

    out: dict[str, TensorSource] = {}
    unused: list[str] = []
    for key, shape in shapes.items():
        name = key.removeprefix(BFL_PREFIX)
        module, _, param = name.rpartition(".")
        if param not in _PARAM:
            unused.append(key)
            continue
        target = bfl_module_to_diffusers(module)
        if target is None:
            unused.append(key)
            continue
        dparam = _PARAM[param]
        if isinstance(target, str):
            out[f"{target}.{dparam}"] = TensorSource(key, swap_halves=module in _SWAPPED)
        else:
            for t, (a, b) in zip(target, split_rows(shape[0], len(target), hidden)):
                out[f"{t}.{dparam}"] = TensorSource(key, a, b)
    return out, unused


def diffusers_to_bfl(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse map on numpy arrays: a diffusers FLUX transformer state dict -> bfl keys
    (fused tensors concatenated, the output modulation's halves swapped back). No prefix."""
    sd = dict(state_dict)
    out: dict[str, np.ndarray] = {}

    def take(dkey: str) -> np.ndarray:
        return np.asarray(sd.pop(dkey))

    def place(bfl_module: str, target: str | tuple[str, ...], dprefix: str = "") -> None:
        targets = (target,) if isinstance(target, str) else target
        is_norm = targets[0].startswith("attn.norm_")
        for bparam, dparam in (("scale", "weight"),) if is_norm else (("weight", "weight"), ("bias", "bias")):
            keys = [f"{dprefix}{t}.{dparam}" for t in targets]
            if not all(k in sd for k in keys):
                continue
            tensor = np.concatenate([take(k) for k in keys], axis=0)
            if bfl_module in _SWAPPED:
                tensor = np.concatenate(np.split(tensor, 2, axis=0)[::-1], axis=0)
            out[f"{bfl_module}.{bparam}"] = tensor

    for module, target in _GLOBAL.items():
        place(module, target)
    blocks = {(m.group(1), int(m.group(2))) for k in sd if (m := re.match(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.", k))}
    for kind, i in sorted(blocks):
        table, bprefix = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
        for module, target in table.items():
            place(f"{bprefix}.{i}.{module}", target, f"{kind}.{i}.")
    if sd:
        raise KeyError(f"diffusers keys with no black-forest-labs name: {sorted(sd)[:10]}")
    return out
