"""LoRA files for the FLUX transformer: reading them (diffusers / PEFT or kohya / black-forest-labs
naming) and attaching their low-rank branches to the model's layers (`convrot_jax.lora`),
W4A4, W4A16 and float layers alike, the fused projections included.

File formats (safetensors; a key is a module name, then the tensor's suffix):

    diffusers / PEFT   transformer.transformer_blocks.0.attn.to_q.lora_A.weight   (r, K)
                       transformer.transformer_blocks.0.attn.to_q.lora_B.weight   (N, r)
                       transformer.transformer_blocks.0.attn.to_q.alpha           optional
    kohya (sd-scripts) lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight    (r, K)
                       lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight      (3N, r)
                       lora_unet_double_blocks_0_img_attn_qkv.alpha               optional

Module names may be diffusers' (with or without "transformer.") or black-forest-labs' (dotted,
optionally under "diffusion_model." as ai-toolkit writes them, or kohya's underscored spelling
under "lora_unet_"); the `.lora_A/.lora_B`, `.lora_down/.lora_up` and `.lora.down/.lora.up`
suffixes are all read. A module's branch is `(alpha / r) * B A` (alpha absent: 1).

Black-forest-labs modules that diffusers splits (`keymaps.bfl_module_to_diffusers`) cover several
diffusers layers with their output rows: `img_attn.qkv` (q, k, v in thirds), `linear1` (q, k, v
of `hidden` rows, then the MLP input) and `final_layer.adaLN_modulation.1` (halves swapped). As
in diffusers' `_convert_kohya_flux_lora_to_diffusers`, such a module is A shared by all its
layers and B split by rows. On this port's fused layers (`flux_flax.fusion`: to_qkv,
to_added_qkv, to_qkv_mlp, outputs concatenated), a LoRA of any member layer becomes a block of the
fused layer's branch: its A is stacked with the others' (the input is shared) and its B fills its
member's rows (zeros elsewhere), so the fused branch is exactly the members' branches
concatenated; a bfl `qkv` or `linear1` LoRA lands on its fused layer whole.

Several LoRAs, each with its own scale, add up: per layer their ranks are concatenated into one
branch. Anything that does not fit raises `LoRAError` naming the file and key: a module with no
layer in this model (a LoRA for another model: Stable Diffusion keys are recognised as such),
rank or shape mismatches, text-encoder weights, and formats other than plain LoRA (LoKr, LoHa,
DoRA, ...).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from convrot_jax.layers import ConvDense4bit, Dense4bitWeightOnly
from convrot_jax.lora import LoRABlocks, LoRAParam, LowRank, attach_lora, detach_lora
from flux_flax.keymaps import bfl_module_to_diffusers, kohya_to_bfl, split_rows, swaps_halves
from flux_flax.transformer import module_path


class LoRAError(ValueError):
    """A LoRA file that cannot be read or applied to this model; the message names the file and key."""


# Tensor suffix -> role.
_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".alpha": "alpha",
}
# Formats we do not support, recognised by a key's tensor name: (regex searched in the key, name).
_UNSUPPORTED = (
    (r"\.hada_", "LoHa (LyCORIS Hadamard product)"),
    (r"\.lokr_", "LoKr (LyCORIS Kronecker product)"),
    (r"\.dora_scale$|\.lora_magnitude_vector", "DoRA (weight-decomposed LoRA)"),
    (r"\.oft_", "OFT (orthogonal fine-tuning)"),
    (r"\.lora_mid\.", "LoCon with a middle (Tucker) factor"),
    (r"\.diff(_b)?$", "a full weight difference (LyCORIS 'full')"),
    (r"\.lora_B\.bias$|\.lora_up\.bias$", "LoRA with a bias"),
)
_TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_UNET_MARKERS = ("down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks", "middle_block")
# diffusers names of the FLUX transformer's linear layers (which of them a model has: `output_layout`).
_FLUX_LAYER = re.compile(r"(single_)?transformer_blocks\.\d+\..+|x_embedder|context_embedder|proj_out|norm_out\.linear"
                         r"|time_text_embed\..+")
_FUSED = {  # a fused layer's name -> its members, relative to the fused layer's parent (flux_flax.fusion)
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "to_qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
}


@dataclasses.dataclass(frozen=True)
class LoRAModule:
    """One low-rank pair of a LoRA file: `(alpha / r) * up @ down` is added to the weights whose
    output rows `targets` lists as (diffusers layer, first row of `up`, row after the last).
    `down` (r, K) and `up` (N, r) are float32, `up`'s rows in diffusers' order."""

    key: str
    down: np.ndarray
    up: np.ndarray
    alpha: float | None
    targets: tuple[tuple[str, int, int], ...]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def alpha_scale(self) -> float:
        """alpha / r, or 1 without an alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class LoRA:
    """The transformer LoRA of one file: its modules, in file order."""

    path: Path
    modules: tuple[LoRAModule, ...]


def _unsupported_format(key: str) -> str | None:
    for pattern, name in _UNSUPPORTED:
        if re.search(pattern, key):
            return name
    return None


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, role) of a LoRA tensor key, or None for another kind of key."""
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def module_targets(name: str, rows: int, hidden: int) -> tuple[tuple[tuple[str, int, int], ...], bool] | None:
    """A LoRA module name in any supported naming -> (diffusers layers with the row ranges of B
    they take, whether B's halves are swapped), or None when the name is no FLUX transformer
    module. `rows` is B's row count; `hidden` is the module's input width (linear1's q/k/v rows)."""
    bfl = None
    if name.startswith("lora_unet_"):
        bfl = kohya_to_bfl(name.removeprefix("lora_unet_"))
        if bfl is None:
            return None
    else:
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if name.startswith(prefix):
                bfl = name.removeprefix(prefix)
        if bfl is None and bfl_module_to_diffusers(name) is not None:
            bfl = name
    if bfl is None:  # diffusers naming: the layer itself.
        for prefix in ("base_model.model.", "transformer."):
            name = name.removeprefix(prefix)
        return (((name, 0, rows),), False) if _FLUX_LAYER.fullmatch(name) else None
    target = bfl_module_to_diffusers(bfl)
    if target is None:
        return None
    if isinstance(target, str):
        return ((target, 0, rows),), swaps_halves(bfl)
    ranges = split_rows(rows, len(target), hidden)
    return tuple((t, a, b) for t, (a, b) in zip(target, ranges)), False


def _describe_foreign(names: Sequence[str]) -> str:
    unet = [n for n in names if any(m in n for m in _UNET_MARKERS)]
    if unet:
        return f"its keys look like a Stable Diffusion / SDXL UNet's (e.g. {unet[0]!r})"
    return f"e.g. {names[0]!r}"


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file as float32 numpy (read through jax on the host CPU: bf16 included)."""
    try:
        with jax.default_device(jax.devices("cpu")[0]), safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"cannot read LoRA file {path}: {e}") from None


def read_lora(path: str | Path) -> LoRA:
    """Reads a LoRA safetensors file (formats: the module docstring) into its modules, checking
    each module's own shapes (A (r, K) against B (N, r)). Which model it fits is checked when it
    is applied (`apply_loras`). Raises `LoRAError` naming the file and the first offending key."""
    path = Path(path)
    if not path.is_file():
        raise LoRAError(f"LoRA file {path} does not exist")
    tensors = _read_tensors(path)
    if not tensors:
        raise LoRAError(f"LoRA file {path} holds no tensors")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for key in tensors:
        unsupported = _unsupported_format(key)
        if unsupported:
            raise LoRAError(f"LoRA file {path} is {unsupported}, which is not supported (plain LoRA only): key {key!r}")
        split = _split_key(key)
        if split is None:
            raise LoRAError(
                f"LoRA file {path}: key {key!r} is not a LoRA tensor (expected .lora_A.weight / .lora_B.weight, "
                ".lora_down.weight / .lora_up.weight, or .alpha)"
            )
        name, role = split
        if name.startswith(_TEXT_ENCODER_PREFIXES):
            raise LoRAError(f"LoRA file {path} has text-encoder weights, which are not supported "
                            f"(only the transformer takes LoRAs): key {key!r}")
        parts.setdefault(name, {})[role] = tensors[key]

    modules, foreign = [], []
    for name, part in parts.items():
        missing = [role for role in ("down", "up") if role not in part]
        if missing:
            raise LoRAError(f"LoRA file {path}: module {name!r} has no {' and no '.join(missing)} weight")
        down, up = part["down"], part["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise LoRAError(f"LoRA file {path}: module {name!r} has A {down.shape} and B {up.shape}, "
                            "expected A (r, in_features) and B (out_features, r) of one rank r")
        alpha = part.get("alpha")
        if alpha is not None and alpha.size != 1:
            raise LoRAError(f"LoRA file {path}: {name}.alpha has shape {alpha.shape}, expected a scalar")
        found = module_targets(name, up.shape[0], down.shape[1])
        if found is None:
            foreign.append(name)
            continue
        targets, swapped = found
        if swapped:
            if up.shape[0] % 2:
                raise LoRAError(f"LoRA file {path}: module {name!r} has B {up.shape}, expected an even number of rows")
            up = np.concatenate(np.split(up, 2, axis=0)[::-1], axis=0)
        modules.append(LoRAModule(name, down, up, None if alpha is None else float(alpha.reshape(())), targets))
    if foreign and not modules:
        raise LoRAError(f"LoRA file {path} is not a FLUX transformer LoRA in a naming this port reads (diffusers / "
                        f"PEFT, kohya / black-forest-labs): {_describe_foreign(foreign)}")
    if foreign:
        raise LoRAError(f"LoRA file {path}: {len(foreign)} module(s) match no FLUX transformer layer: "
                        + ", ".join(repr(n) for n in foreign[:5]) + (" ..." if len(foreign) > 5 else ""))
    return LoRA(path, tuple(modules))


# ---------------------------------------------------------------------------------------------
# The model side.

def lora_layers(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
    """(dotted path, layer) for every linear layer of `model` that can carry a branch."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (nnx.Linear, ConvDense4bit, Dense4bitWeightOnly)):
            yield module_path(path), node


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Where a diffusers layer's outputs are in this model: rows [start, start + rows) of the
    layer at `path`, which is `in_features` x `width`."""

    path: str
    start: int
    rows: int
    in_features: int
    width: int


def output_layout(model: nnx.Module) -> dict[str, _Rows]:
    """{diffusers layer name: where its outputs are}: a layer itself, or its rows in a fused layer
    (members in `_FUSED` order, sized as `keymaps.split_rows`, as `flux_flax.fusion` builds them)."""
    layout = {}
    for path, layer in lora_layers(model):
        parent, _, name = path.rpartition(".")
        k, n = int(layer.in_features), int(layer.out_features)
        members = _FUSED.get(name)
        if members is None:
            layout[path] = _Rows(path, 0, n, k, n)
            continue
        for member, (a, b) in zip(members, split_rows(n, len(members), k)):
            layout[f"{parent}.{member}"] = _Rows(path, a, b - a, k, n)
    return layout


class _Part(NamedTuple):
    """One LoRA module's share of a layer's branch: A, B over the layer's rows, per-rank scale,
    and the row ranges of B it fills (B is zero elsewhere)."""

    down: np.ndarray
    up: np.ndarray
    scale: np.ndarray
    row_ranges: tuple[tuple[int, int], ...]


def _branches(model: nnx.Module, loras: Sequence[tuple[LoRA, float]]) -> dict[str, list[_Part]]:
    """{layer path: [part, ...]} for every module of every LoRA, member by member of a fused layer
    (by first row; in file order within a member), so that each member's ranks are contiguous: the
    W4A4 GEMM's epilogue then multiplies a member's output tiles by its own rank chunks only.
    Raises LoRAError for what does not fit."""
    layout = output_layout(model)
    out: dict[str, list[tuple[int, _Part]]] = {}
    for lora, user_scale in loras:
        for module in lora.modules:
            where = f"LoRA file {lora.path}: module {module.key!r}"
            missing = [name for name, _, _ in module.targets if name not in layout]
            if missing:
                raise LoRAError(f"{where} targets {', '.join(missing)}, which this model does not have")
            by_layer: dict[str, list[tuple[_Rows, int, int]]] = {}
            for name, a, b in module.targets:
                rows = layout[name]
                if module.down.shape[1] != rows.in_features or b - a != rows.rows:
                    raise LoRAError(
                        f"{where}: A {module.down.shape} and B rows {b - a} do not fit {name} "
                        f"(in_features {rows.in_features}, out_features {rows.rows})")
                by_layer.setdefault(rows.path, []).append((rows, a, b))
            scale = np.full((module.rank,), user_scale * module.alpha_scale, np.float32)
            for path, pieces in by_layer.items():
                up = np.zeros((pieces[0][0].width, module.rank), np.float32)
                for rows, a, b in pieces:
                    up[rows.start : rows.start + rows.rows] = module.up[a:b]
                row_ranges = tuple((rows.start, rows.start + rows.rows) for rows, _, _ in pieces)
                out.setdefault(path, []).append((pieces[0][0].start, _Part(module.down, up, scale, row_ranges)))
    return {path: [part for _, part in sorted(parts, key=lambda p: p[0])] for path, parts in out.items()}


def remove_loras(model: nnx.Module) -> None:
    """Detaches every LoRA branch from `model`, IN PLACE: its graph is then exactly the original."""
    for _, layer in list(lora_layers(model)):
        detach_lora(layer)


def apply_loras(model: nnx.Module, loras: Sequence[tuple[LoRA, float]], *, dtype=None) -> None:
    """Replaces, IN PLACE, `model`'s LoRA branches by those of `loras` ((LoRA, scale) pairs, all at
    once): each layer a LoRA touches gets one branch with every touching module's rank, in order,
    factors cast to `dtype` (default: the model's dtype), scales in float32. Checks everything
    before changing the model: on a LoRAError the model keeps its branches."""
    dtype = dtype or model.dtype
    branches = _branches(model, loras)
    remove_loras(model)
    layers = dict(lora_layers(model))
    for path, parts in branches.items():
        # Cast on the host: LowRank checks B against its blocks before it moves to the device.
        down = np.concatenate([p.down for p in parts], axis=0).astype(dtype)
        up = np.concatenate([p.up for p in parts], axis=1).astype(dtype)
        scale = np.concatenate([p.scale for p in parts])
        attach_lora(layers[path], LowRank(down, up, scale, blocks=_blocks(parts)))


def _blocks(parts: Sequence[_Part]) -> LoRABlocks:
    """The (row start, row end, rank start, rank end) rectangles of B outside which it is zero:
    each part's row ranges over its ranks, the parts' ranks side by side. From the layout alone,
    so LoRAs of the same ranks on the same layers give the same (static) blocks."""
    blocks, first = [], 0
    for part in parts:
        rank = part.down.shape[0]
        blocks += [(a, b, first, first + rank) for a, b in part.row_ranges]
        first += rank
    return tuple(blocks)


def check_scale(scale: float) -> float:
    """A LoRA scale as a float; ValueError unless finite."""
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"a LoRA scale must be a finite number, got {scale}")
    return scale


def replicate_loras(model: nnx.Module, sharding: jax.sharding.Sharding) -> None:
    """Places `model`'s LoRA factors with `sharding` (the pipeline's replicated one)."""
    nnx.update(model, jax.device_put(nnx.state(model, LoRAParam), sharding))
