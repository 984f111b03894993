"""The FLUX VAE decoder in Flax NNX: a port of diffusers' `AutoencoderKL` decoder (`vae.Decoder`,
`UNetMidBlock2D`, `UpDecoderBlock2D`, `ResnetBlock2D`, `Upsample2D` and the mid-block `Attention`).

Module and attribute names mirror diffusers, so a diffusers `vae/` folder loads with a mechanical
key map (`load_vae`): `decoder.up_blocks.0.resnets.1.conv1.weight` -> the same path, `kernel`.
Tensors are NHWC (the Flax convention): the decoder takes (B, h, w, latent_channels) latents and
returns (B, 8h, 8w, 3) images in [-1, 1]. Only the decoder is ported: text-to-image never encodes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The decoder half of a diffusers `AutoencoderKL` config; defaults are FLUX.1's VAE."""

    latent_channels: int = 16
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    @property
    def scale_factor(self) -> int:
        """How much the decoder upsamples: 2 per block but the last (8 for FLUX)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, data: dict) -> "VAEConfig":
        """From a diffusers `vae/config.json` dict; refuses decoders this port does not implement."""
        if data.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE act_fn {data['act_fn']!r} is not supported (FLUX's VAE uses 'silu')")
        up_types = data.get("up_block_types", ["UpDecoderBlock2D"] * len(data.get("block_out_channels", [])))
        if any(t != "UpDecoderBlock2D" for t in up_types):
            raise ValueError(f"VAE up_block_types {up_types} are not supported (only UpDecoderBlock2D)")
        return cls(
            latent_channels=data.get("latent_channels", 4),
            out_channels=data.get("out_channels", 3),
            block_out_channels=tuple(data.get("block_out_channels", (64,))),
            layers_per_block=data.get("layers_per_block", 1),
            norm_num_groups=data.get("norm_num_groups", 32),
            scaling_factor=data.get("scaling_factor", 0.18215),
            shift_factor=data.get("shift_factor") or 0.0,
            use_post_quant_conv=data.get("use_post_quant_conv", True),
            mid_block_add_attention=data.get("mid_block_add_attention", True),
        )

    def to_diffusers(self) -> dict:
        """The `AutoencoderKL(**config)` arguments that build the matching diffusers VAE."""
        n = len(self.block_out_channels)
        return dict(
            in_channels=self.out_channels,
            out_channels=self.out_channels,
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            block_out_channels=list(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            scaling_factor=self.scaling_factor,
            shift_factor=self.shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=self.use_post_quant_conv,
            mid_block_add_attention=self.mid_block_add_attention,
        )

    @classmethod
    def tiny(cls, latent_channels: int = 16) -> "VAEConfig":
        """Four blocks (so still 8x) of a few channels: for tests and the demo."""
        return cls(latent_channels=latent_channels, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


def _conv(cin: int, cout: int, kernel: int, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    padding = kernel // 2  # torch's padding=1 for 3x3, 0 for 1x1
    return nnx.Conv(cin, cout, (kernel, kernel), padding=padding, dtype=dtype, param_dtype=dtype, rngs=rngs)


def _group_norm(channels: int, groups: int, dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """GroupNorm-SiLU-Conv twice plus a (1x1-projected when widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = _group_norm(in_channels, groups, dtype, rngs)
        self.conv1 = _conv(in_channels, out_channels, 3, dtype, rngs)
        self.norm2 = _group_norm(out_channels, groups, dtype, rngs)
        self.conv2 = _conv(out_channels, out_channels, 3, dtype, rngs)
        self.conv_shortcut = _conv(in_channels, out_channels, 1, dtype, rngs) if in_channels != out_channels else None

    def __call__(self, input_tensor: jnp.ndarray) -> jnp.ndarray:
        hidden_states = self.conv1(nnx.silu(self.norm1(input_tensor)))
        hidden_states = self.conv2(nnx.silu(self.norm2(hidden_states)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return input_tensor + hidden_states


class Attention(nnx.Module):
    """The mid-block's single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, channels: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.group_norm = _group_norm(channels, groups, dtype, rngs)
        linear = lambda: nnx.Linear(channels, channels, dtype=dtype, param_dtype=dtype, rngs=rngs)  # noqa: E731
        self.to_q, self.to_k, self.to_v = linear(), linear(), linear()
        self.to_out = nnx.List([linear()])

    def __call__(self, hidden_states: jnp.ndarray) -> jnp.ndarray:
        b, h, w, c = hidden_states.shape
        residual = hidden_states
        x = self.group_norm(hidden_states).reshape(b, h * w, 1, c)  # one head of width c
        out = jax.nn.dot_product_attention(self.to_q(x), self.to_k(x), self.to_v(x))
        return self.to_out[0](out).reshape(b, h, w, c) + residual


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, dtype, rngs)

    def __call__(self, hidden_states: jnp.ndarray) -> jnp.ndarray:
        hidden_states = jnp.repeat(jnp.repeat(hidden_states, 2, axis=1), 2, axis=2)
        return self.conv(hidden_states)


class UNetMidBlock2D(nnx.Module):
    """resnet, (attention, resnet)."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, dtype, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Attention(channels, groups, dtype=dtype, rngs=rngs)] if add_attention else [])

    def __call__(self, hidden_states: jnp.ndarray) -> jnp.ndarray:
        hidden_states = self.resnets[0](hidden_states)
        for i, resnet in enumerate(self.resnets[1:]):
            if self.attentions:
                hidden_states = self.attentions[i](hidden_states)
            hidden_states = resnet(hidden_states)
        return hidden_states


class UpDecoderBlock2D(nnx.Module):
    """`num_layers` resnets, then an optional 2x upsampler."""

    def __init__(
        self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool, *, dtype, rngs
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, dtype=dtype, rngs=rngs)
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)] if add_upsample else [])

    def __call__(self, hidden_states: jnp.ndarray) -> jnp.ndarray:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        for upsampler in self.upsamplers:
            hidden_states = upsampler(hidden_states)
        return hidden_states


class Decoder(nnx.Module):
    """conv_in, mid_block, up_blocks (widest first), GroupNorm-SiLU, conv_out."""

    def __init__(self, config: VAEConfig, *, dtype, rngs: nnx.Rngs):
        channels = list(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = _conv(config.latent_channels, channels[0], 3, dtype, rngs)
        self.mid_block = UNetMidBlock2D(channels[0], groups, config.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups,
                    add_upsample=i < len(channels) - 1, dtype=dtype, rngs=rngs,
                )
                for i in range(len(channels))
            ]
        )
        self.conv_norm_out = _group_norm(channels[-1], groups, dtype, rngs)
        self.conv_out = _conv(channels[-1], config.out_channels, 3, dtype, rngs)

    def __call__(self, sample: jnp.ndarray) -> jnp.ndarray:
        sample = self.mid_block(self.conv_in(sample))
        for up_block in self.up_blocks:
            sample = up_block(sample)
        return self.conv_out(nnx.silu(self.conv_norm_out(sample)))


class AutoencoderKLDecoder(nnx.Module):
    """The decoding half of diffusers' `AutoencoderKL`: `decode` is `vae.decode(z)`, NHWC."""

    def __init__(self, config: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.post_quant_conv = (
            _conv(config.latent_channels, config.latent_channels, 1, dtype, rngs) if config.use_post_quant_conv else None
        )
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)

    def unscale(self, latents: jnp.ndarray) -> jnp.ndarray:
        """Sampler latents -> VAE latents: `latents / scaling_factor + shift_factor`."""
        return latents / self.config.scaling_factor + self.config.shift_factor

    def decode(self, z: jnp.ndarray) -> jnp.ndarray:
        """(B, h, w, latent_channels) VAE latents -> (B, 8h, 8w, out_channels) image in about [-1, 1]."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _torch_to_flax(key: str, tensor: jax.Array, like: jax.ShapeDtypeStruct) -> jax.Array:
    """A diffusers tensor in the Flax layout of `like`: conv (O, I, kh, kw) -> (kh, kw, I, O),
    linear (O, I) -> (I, O) (also from the 1x1-conv attention weights of old VAE files)."""
    if len(like.shape) == 4:
        tensor = tensor.transpose(2, 3, 1, 0)
    elif len(like.shape) == 2:
        tensor = tensor.reshape(tensor.shape[0], tensor.shape[1]).T if tensor.ndim in (2, 4) else tensor
    if tuple(tensor.shape) != tuple(like.shape):
        raise ValueError(f"VAE weight {key!r}: expected shape {tuple(like.shape)} (Flax layout), got {tuple(tensor.shape)}")
    return tensor.astype(like.dtype)


def _diffusers_key(path: tuple) -> str:
    *prefix, leaf = (str(p) for p in path)
    return ".".join([*prefix, {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def _flax_to_torch(array: np.ndarray) -> np.ndarray:
    """The inverse of `_torch_to_flax`: conv (kh, kw, I, O) -> (O, I, kh, kw), linear (I, O) -> (O, I)."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array.T if array.ndim == 2 else array


def save_vae(vae: AutoencoderKLDecoder, folder: str | Path) -> Path:
    """Writes the decoder as a diffusers `vae/` folder that `load_vae` (and diffusers, for the
    decoder half) reads: config.json and the decoder's tensors in PyTorch layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "AutoencoderKL", **vae.config.to_diffusers()}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {
        _diffusers_key(path): np.ascontiguousarray(_flax_to_torch(np.asarray(variable.get_value())))
        for path, variable in nnx.to_flat_state(nnx.state(vae, nnx.Param))
    }
    save_file(tensors, str(folder / VAE_WEIGHTS))
    return folder


def load_vae(folder: str | Path, *, dtype=jnp.float32) -> AutoencoderKLDecoder:
    """Loads the decoder from a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors).

    The module is built abstractly (`nnx.eval_shape`) and every parameter is read from the file;
    a missing or misshapen tensor, or a decoder tensor the config does not use, is an error.
    """
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / VAE_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"VAE file missing: {path} (expected a diffusers-format vae/ folder)")
    config = VAEConfig.from_diffusers(json.loads(config_path.read_text()))
    abstract = nnx.eval_shape(lambda: AutoencoderKLDecoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)

    flat = []
    with safe_open(weights_path, framework="flax") as f:
        keys = set(f.keys())
        for path, variable in nnx.to_flat_state(abstract_state):
            key = _diffusers_key(path)
            if key not in keys:
                raise KeyError(f"VAE weight {key!r} is missing from {weights_path}")
            keys.discard(key)
            flat.append((path, variable.replace(_torch_to_flax(key, f.get_tensor(key), variable.get_value()))))
    unused = sorted(k for k in keys if k.startswith(("decoder.", "post_quant_conv.")))
    if unused:
        raise ValueError(f"{weights_path} has decoder weights that {config} does not use: {unused[:5]}...")
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
