"""FLUX text-to-image in JAX: prompt -> text embeddings (JAX, or PyTorch on request) -> flow-matching denoising loop
(one compiled program: `lax.fori_loop` over the steps) -> VAE decode -> uint8 images / PNG files.

Mirrors diffusers' `FluxPipeline.__call__` (no true CFG, no IP-adapter): the same schedule, the
same packing and ids, the same Euler step and the same decode, so both give the same image from
the same weights and initial latents (tests/test_pipeline.py checks it).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from convrot_jax import ops
from flux_flax import interrupts, sampling, sequence_parallel
from flux_flax.checkpoint import load_checkpoint, stored_part
from flux_flax.config import FluxConfig
from flux_flax.fusion import fuse_projections
from flux_flax.loading import load_transformer
from flux_flax.lora import LoRA, apply_loras, check_scale, read_lora, replicate_loras
from flux_flax.paths import user_path
from flux_flax.producers import DEFAULT_KINDS, fuse_producers
from flux_flax.settings import VAE_SCALE_FACTOR, GenerationSettings
from flux_flax.t5 import T5Config
from flux_flax.text import TEXT_PARTS, PromptEmbeds, PromptEncoder, dtype_name
from flux_flax.transformer import set_attention
from flux_flax.vae import AutoencoderKLDecoder, load_vae


class PipelineMismatchError(ValueError):
    """The transformer, VAE and text encoders do not fit together (widths, channels, configs)."""


class NonFiniteOutputError(RuntimeError):
    """A generation produced NaN or Inf latents or pixels (a damaged model or bad settings):
    raised instead of writing a black image."""


def check_components(config: FluxConfig, vae: AutoencoderKLDecoder, text_encoders: PromptEncoder) -> None:
    """Raises `PipelineMismatchError` naming the sizes that disagree."""
    problems = []
    if vae.config.scale_factor != VAE_SCALE_FACTOR:
        problems.append(f"the VAE upsamples {vae.config.scale_factor}x, FLUX needs {VAE_SCALE_FACTOR}x")
    if config.in_channels != 4 * vae.config.latent_channels:
        problems.append(
            f"transformer in_channels {config.in_channels} != 4 x VAE latent_channels {vae.config.latent_channels}"
        )
    t5_width = text_encoders.text_encoder_2.config.d_model
    if config.joint_attention_dim != t5_width:
        problems.append(f"transformer joint_attention_dim {config.joint_attention_dim} != T5 width {t5_width}")
    clip_width = text_encoders.text_encoder.config.hidden_size
    if config.pooled_projection_dim != clip_width:
        problems.append(f"transformer pooled_projection_dim {config.pooled_projection_dim} != CLIP width {clip_width}")
    if problems:
        raise PipelineMismatchError("the pipeline's parts do not fit together: " + "; ".join(problems))


def require_finite(values: jax.Array, what: str, prompts: Sequence[str]) -> None:
    """Raises `NonFiniteOutputError` if `values` (one row per prompt) hold NaN or Inf, naming the prompts."""
    finite = np.asarray(jnp.isfinite(values).reshape(values.shape[0], -1).all(axis=1))
    if not finite.all():
        bad = [repr(prompts[i][:60]) for i in np.flatnonzero(~finite) if i < len(prompts)]
        raise NonFiniteOutputError(
            f"the {what} hold NaN or Inf for {len(bad) or 'padding'} prompt(s) ({', '.join(bad)}): "
            "no image written; check the checkpoint (load it with verification) and the settings"
        )


PARALLEL_MODES = ("data", "sequence")


def device_mesh(devices: int, parallel: str = "data", sequence_devices: int | None = None) -> Mesh:
    """A ("data", "sequence") mesh over the first `devices` devices: with `parallel="data"` all
    of them along the batch; with "sequence", `sequence_devices` of them (default: all) along one
    image's tokens and the rest along the batch. A ValueError names the numbers at fault.

    Under `jax.distributed` (several processes) a mesh of several devices takes every process's
    devices, all of them; a single device is this process's first (each process then computes
    alone)."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
    if devices < 1:
        raise ValueError(f"devices must be at least 1, got {devices}")
    if parallel == "data":
        if sequence_devices is not None:
            raise ValueError("sequence_devices applies to parallel='sequence' only")
        sequence = 1
    else:
        sequence = devices if sequence_devices is None else sequence_devices
        if sequence < 1 or devices % sequence:
            raise ValueError(f"sequence_devices must divide devices ({devices}), got {sequence}")
    available = jax.devices() if devices > 1 else jax.local_devices()
    found, platform, processes = len(available), available[0].platform, jax.process_count()
    if devices > found:
        where = (f"this machine has only {found} local {platform} device(s)" if processes == 1
                 else f"the {processes} processes have only {found} {platform} device(s) in all")
        raise ValueError(f"asked for {devices} devices, but {where}")
    if processes > 1 and 1 < devices < found:
        raise ValueError(f"asked for {devices} devices: under jax.distributed use 1 or all {found} devices "
                         f"of the {processes} processes")
    grid = np.array(available[:devices]).reshape(devices // sequence, sequence)
    return Mesh(grid, (sequence_parallel.DATA, sequence_parallel.SEQUENCE))


def denoise_on_mesh(graphdef: nnx.GraphDef, mesh: Mesh, parallel: str, state: nnx.State, latents: jax.Array,
                    prompt_embeds: jax.Array, pooled: jax.Array, img_ids: jax.Array, txt_ids: jax.Array,
                    sigmas: jax.Array, guidance: jax.Array | None, on_step=None) -> jax.Array:
    """`sampling.denoise` of the transformer `nnx.merge(graphdef, state)` (call inside jit), on
    `mesh` as `parallel` says: "data" as one SPMD program over whatever shardings the inputs
    carry, "sequence" through `sequence_parallel.denoise` (the batch a multiple of the "data"
    axis)."""

    def loop(state, latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas, guidance, on_step):
        return sampling.denoise(nnx.merge(graphdef, state), latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas,
                                guidance, on_step=on_step)

    args = (state, latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas, guidance)
    if parallel == "sequence":
        return sequence_parallel.denoise(loop, mesh, *args, on_step=on_step)
    return loop(*args, on_step)


def to_uint8(images: jax.Array) -> np.ndarray:
    """[-1, 1] float images -> uint8, as diffusers' `VaeImageProcessor.postprocess`."""
    images = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0, 1)
    return (images * 255).round().astype(np.uint8)


class FluxPipeline:
    """A FLUX.1 text-to-image pipeline around an NNX transformer (bf16 or ConvRot-quantized).

    `dynamic_shift` picks the dev schedule (True) or schnell's (False); by default it follows the
    guidance embedding (dev has one, schnell not). The denoising loop is one jitted program per
    (batch, size, steps); with `progress`, a tqdm bar follows the steps through a host callback
    (`jax.debug.callback`, under 1 ms a step; a jitted step in a Python loop costs about the same
    but dispatches every step, flattening the model's weights each time).

    `devices` (None: 1, today's single-device run) > 1 samples over the first that many devices
    (`device_mesh`), the weights replicated on each. `parallel="data"` splits the batch axis of
    the latents, prompt embeddings, pooled embeddings and guidance over the mesh's "data" axis, and
    the same jitted loop runs SPMD (XLA's sharding propagation; no hand-written communication).
    `parallel="sequence"` splits each image's text and image tokens over `sequence_devices` of
    them (default: all; the rest split the batch) with Ulysses attention
    (`flux_flax.sequence_parallel`); the model's heads must divide by `sequence_devices`. A batch
    that does not divide by the "data" axis is padded by repeating its last item, and the padding
    is dropped from the result. (`convrot-flux generate --devices` defaults to 1.)

    LoRAs (`load_lora`, `unload_loras`; `flux_flax.lora`) are low-rank branches beside the
    transformer's layers, never merged into them: their factors are inputs of the compiled loop,
    so loading other LoRAs of the same ranks, or changing scales, does not recompile, and
    unloading them all gives back the base model's graph (and compiled program) exactly.
    """

    def __init__(
        self,
        transformer: nnx.Module,
        vae: AutoencoderKLDecoder,
        text_encoders: PromptEncoder,
        *,
        dynamic_shift: bool | None = None,
        progress: bool = True,
        devices: int | None = None,
        parallel: str = "data",
        sequence_devices: int | None = None,
    ):
        self.config: FluxConfig = transformer.config
        check_components(self.config, vae, text_encoders)
        self.transformer, self.vae, self.text_encoders = transformer, vae, text_encoders
        self.dynamic_shift = self.config.guidance_embeds if dynamic_shift is None else dynamic_shift
        self.progress = progress
        self.devices = 1 if devices is None else devices
        self.parallel = parallel
        self.mesh = device_mesh(self.devices, parallel, sequence_devices)
        sequence_parallel.check_heads(self.config.num_attention_heads, self.mesh.shape[sequence_parallel.SEQUENCE])
        if self.devices > 1:
            for module in (transformer, vae):
                nnx.update(module, jax.device_put(nnx.state(module), NamedSharding(self.mesh, P())))
        self._bar: tqdm | None = None
        # Where each part came from, for the user and the PNGs ("transformer", "text_encoder_2"), and
        # the checkpoints among them (part -> folder); from_pretrained fills both.
        self.sources: dict[str, str] = {}
        self.checkpoints: dict[str, Path] = {}
        self.loras: list[tuple[LoRA, float]] = []
        # The graph definitions are static arguments, so a transformer quantized in place after
        # this point gets its own compilation rather than a stale structure. On several devices
        # the results (latents, pixels: a few MB) come back replicated, so that every process
        # of a multi-host run can read them.
        replicated = {"out_shardings": NamedSharding(self.mesh, P())} if self.devices > 1 else {}
        self._denoise = jax.jit(self._denoise_loop, static_argnums=0, **replicated)
        self._decode = jax.jit(_decode, static_argnums=0, static_argnames=("height", "width"), **replicated)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        checkpoint: str | Path | Sequence[str | Path] | None = None,
        verify: bool = True,
        dtype=jnp.bfloat16,
        text_backend: str = "jax",
        text_dtype=None,
        text_device: str = "cpu",
        max_sequence_length: int | None = None,
        cache_dir: str | Path | None = None,
        fuse: bool = True,
        progress: bool = True,
        devices: int | None = None,
        attention: str | None = None,
        parallel: str = "data",
        sequence_devices: int | None = None,
    ) -> "FluxPipeline":
        """Loads a diffusers-format FLUX folder (tokenizer/, text_encoder/, tokenizer_2/,
        text_encoder_2/, vae/, transformer/). `checkpoint`: one or several `convrot-convert`
        checkpoints, each replacing the part its metadata names (the transformer; the T5 encoder
        `text_encoder_2`, JAX backend only), whose folder may then be absent; their files are
        checked against their digests unless not `verify`. `sources` says what was loaded for each.
        T5 length: 512 for dev, 256 for schnell, by default. `fuse` concatenates the projections
        that read the same input (`flux_flax.fusion`; exact) and computes the producers of
        `flux_flax.producers.DEFAULT_KINDS` inside their W4A4 layers' quantization.

        `text_backend` runs the text encoders in "jax" (the Flax ports; torch is never imported)
        or "torch" (transformers' models on `text_device`); `text_dtype` (a jnp or torch dtype or
        its name, default bfloat16) is their weights' dtype (a T5 checkpoint keeps its own).
        `devices`, `parallel` and `sequence_devices`: as the constructor's, the device count checked
        before anything loads and the heads as soon as the transformer has. `attention`: the
        transformer's attention implementation (`flux_flax.set_attention`; None: the exact default)."""
        device_mesh(1 if devices is None else devices, parallel, sequence_devices)
        if attention is not None:
            ops.check_attention_implementation(attention)
        if text_backend not in ("jax", "torch"):
            raise ValueError(f"text_backend must be 'jax' or 'torch', got {text_backend!r}")
        model_dir = user_path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model folder {model_dir} does not exist")
        checkpoints = _checkpoints_by_part(checkpoint)
        if "text_encoder_2" in checkpoints and text_backend != "jax":
            raise ValueError(f"the T5 checkpoint {checkpoints['text_encoder_2']} runs on the JAX text backend only "
                             f"(text_backend {text_backend!r})")
        parts = (*TEXT_PARTS, "vae", "transformer")
        missing = [f"{p}/" for p in parts if p not in checkpoints and not (model_dir / p).is_dir()]
        if missing:
            raise FileNotFoundError(f"model folder {model_dir} has no {', '.join(missing)} (expected a diffusers-format FLUX folder)")
        transformer, sources = _load_transformer(model_dir, checkpoints.get("transformer"), dtype, verify)
        if parallel == "sequence":
            sequence_parallel.check_heads(transformer.config.num_attention_heads, sequence_devices or devices or 1)
        if fuse:
            fuse_producers(fuse_projections(transformer), DEFAULT_KINDS)
        set_attention(transformer, attention)
        if max_sequence_length is None:
            max_sequence_length = 512 if transformer.config.guidance_embeds else 256
        t5 = None
        sources["text_encoder_2"] = f"{model_dir / 'text_encoder_2'} ({text_backend}, {dtype_name(text_dtype or 'bfloat16')})"
        if "text_encoder_2" in checkpoints:
            t5, metadata = load_checkpoint(checkpoints["text_encoder_2"], verify=verify, part="text_encoder_2")
            _require_same_model(checkpoints["text_encoder_2"], model_dir / "text_encoder_2", t5.config,
                                T5Config.from_dict)
            sources["text_encoder_2"] = _describe_checkpoint(checkpoints["text_encoder_2"], metadata)
        text_encoders = _load_text_encoders(model_dir, text_backend, max_sequence_length=max_sequence_length,
                                            dtype=text_dtype or "bfloat16", device=text_device, cache_dir=cache_dir,
                                            t5=t5, t5_checkpoint=checkpoints.get("text_encoder_2"))
        vae = load_vae(model_dir / "vae", dtype=dtype)
        pipe = cls(transformer, vae, text_encoders, dynamic_shift=_scheduler_shift(model_dir), progress=progress,
                   devices=devices, parallel=parallel, sequence_devices=sequence_devices)
        pipe.sources, pipe.checkpoints = sources, checkpoints
        return pipe

    def load_lora(self, path: str | Path, scale: float = 1.0) -> None:
        """Adds the LoRA file at `path` (diffusers / PEFT or kohya naming) with `scale` to those
        loaded. A file that does not fit raises `flux_flax.lora.LoRAError` naming the key, and
        the LoRAs loaded before stay as they were."""
        lora = read_lora(user_path(path))
        self._set_loras([*self.loras, (lora, check_scale(scale))])

    def unload_loras(self) -> None:
        """Removes every LoRA: the transformer is then exactly the base model."""
        self._set_loras([])

    def _set_loras(self, loras: list[tuple[LoRA, float]]) -> None:
        apply_loras(self.transformer, loras)
        self.loras = loras
        if self.devices > 1:
            replicate_loras(self.transformer, NamedSharding(self.mesh, P()))

    def lora_metadata(self) -> dict[str, str]:
        """{"loras": "FILE:SCALE, ..."} for the PNG text chunks when LoRAs are loaded, else {}."""
        if not self.loras:
            return {}
        return {"loras": ", ".join(f"{lora.path}:{scale:g}" for lora, scale in self.loras)}

    # The compiled parts.
    def _denoise_loop(self, graphdef, state, latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas, guidance):
        on_step = self._on_step if self.progress else None  # fixed at trace time
        return denoise_on_mesh(graphdef, self.mesh, self.parallel, state, latents, prompt_embeds, pooled, img_ids,
                               txt_ids, sigmas, guidance, on_step)

    def _on_step(self, _) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def _split_batch(self, batch_arrays: tuple, shared: tuple) -> tuple[tuple, tuple]:
        """With several devices: `batch_arrays` padded to a multiple of the "data" axis (the last
        item repeated) and split on it, `shared` replicated. Otherwise both as given."""
        if self.devices == 1:
            return batch_arrays, shared

        def split(x: jax.Array) -> jax.Array:
            pad = -x.shape[0] % self.mesh.shape[sequence_parallel.DATA]
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x
            return jax.device_put(x, NamedSharding(self.mesh, P("data")))

        return jax.tree.map(split, batch_arrays), jax.device_put(shared, NamedSharding(self.mesh, P()))

    # The steps of a generation, usable one by one.
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        return self.text_encoders.encode(prompts)

    def prepare_latents(self, seeds: Sequence[int], height: int, width: int) -> jax.Array:
        """Packed Gaussian noise (B, tokens, in_channels); image k's noise depends only on `seeds[k]`."""
        shape = sampling.latent_shape(height, width, self.config.in_channels // 4)
        noise = [jax.random.normal(jax.random.key(s), shape, jnp.float32) for s in seeds]
        return sampling.pack_latents(jnp.stack(noise))

    def denoise(self, latents: jax.Array, embeds: PromptEmbeds, settings: GenerationSettings) -> jax.Array:
        """Runs every step on packed float32 `latents`; returns the final packed latents."""
        batch, seq_len = latents.shape[:2]
        expected = (len(embeds.prompt_embeds), len(sampling.latent_image_ids(settings.height, settings.width)))
        if (batch, seq_len) != expected:
            raise ValueError(
                f"latents {tuple(latents.shape)} do not fit {len(embeds.prompt_embeds)} prompt(s) at "
                f"{settings.width}x{settings.height}: expected (batch, tokens) = {expected}"
            )
        sigmas = sampling.flux_sigmas(settings.num_inference_steps, seq_len, dynamic_shift=self.dynamic_shift)
        guidance = (
            jnp.full((batch,), settings.guidance_scale, jnp.float32) if self.config.guidance_embeds else None
        )
        dtype = self.transformer.dtype
        (latents, prompt_embeds, pooled, guidance), (img_ids, txt_ids, sigmas) = self._split_batch(
            (
                jnp.asarray(latents, jnp.float32),
                jnp.asarray(embeds.prompt_embeds, dtype),
                jnp.asarray(embeds.pooled_prompt_embeds, dtype),
                guidance,
            ),
            (
                jnp.asarray(sampling.latent_image_ids(settings.height, settings.width)),
                jnp.asarray(sampling.text_ids(embeds.prompt_embeds.shape[1])),
                jnp.asarray(sigmas),
            ),
        )
        with tqdm(total=settings.num_inference_steps, desc="denoising", disable=not self.progress) as self._bar:
            out = self._denoise(*nnx.split(self.transformer), latents, prompt_embeds, pooled, img_ids, txt_ids,
                                sigmas, guidance)
            out.block_until_ready()
        self._bar = None
        return out[:batch]

    def decode(self, latents: jax.Array, height: int, width: int) -> jax.Array:
        """Packed latents -> (B, height, width, 3) images in about [-1, 1], in the VAE's dtype."""
        (padded,), _ = self._split_batch((latents,), ())
        return self._decode(*nnx.split(self.vae), padded, height=height, width=width)[: latents.shape[0]]

    def __call__(
        self, prompts: Sequence[str], settings: GenerationSettings = GenerationSettings(), *, latents: jax.Array | None = None
    ) -> np.ndarray:
        """(len(prompts), H, W, 3) uint8 images. `latents` (packed) replaces the seeded noise."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts: the prompt list is empty")
        embeds = self.encode_prompts(prompts)
        if latents is None:
            latents = self.prepare_latents(
                [settings.seed + k for k in range(len(prompts))], settings.height, settings.width
            )
        latents = self.denoise(latents, embeds, settings)
        require_finite(latents, "final latents", prompts)
        images = self.decode(latents, settings.height, settings.width)
        require_finite(images, "decoded images", prompts)
        return to_uint8(images)

    def generate_pngs(
        self,
        prompts: Sequence[str],
        settings: GenerationSettings,
        out_dir: str | Path,
        *,
        batch_size: int = 1,
        metadata: dict[str, str] | None = None,
    ) -> list[Path]:
        """One PNG per prompt in `out_dir`, sampled `batch_size` at a time (the last batch is padded,
        so one compilation serves every batch); prompt k gets seed `settings.seed + k`. In a
        multi-host run every process samples, and process 0 alone writes (the others return [])."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts: the prompt list is empty")
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        paths = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            seeds = [settings.seed + start + k for k in range(batch_size)]
            latents = self.prepare_latents(seeds, settings.height, settings.width)
            images = self(chunk + [chunk[-1]] * (batch_size - len(chunk)), settings, latents=latents)
            if jax.process_index() != 0:
                continue
            for k, prompt in enumerate(chunk):
                name = image_filename(start + k, prompt, seeds[k])
                paths.append(save_png(images[k], Path(out_dir) / name, prompt, seeds[k], settings,
                                      devices=str(self.devices), parallel=self.parallel, **self.lora_metadata(),
                                      **(metadata or {})))
        return paths


def _decode(graphdef: nnx.GraphDef, state: nnx.State, latents: jax.Array, *, height: int, width: int) -> jax.Array:
    vae = nnx.merge(graphdef, state)
    latents = sampling.unpack_latents(latents, height, width).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    return vae.decode(vae.unscale(latents))


def _load_text_encoders(model_dir: Path, backend: str, *, max_sequence_length: int, dtype, device: str,
                        cache_dir: str | Path | None, t5: nnx.Module | None, t5_checkpoint: Path | None) -> PromptEncoder:
    if backend == "torch":
        from flux_flax.text import TextEncoders

        return TextEncoders.from_pretrained(model_dir, max_sequence_length=max_sequence_length, dtype=dtype,
                                            device=device, cache_dir=cache_dir)
    from flux_flax.text_jax import JaxTextEncoders

    return JaxTextEncoders.from_pretrained(model_dir, max_sequence_length=max_sequence_length, dtype=dtype,
                                           cache_dir=cache_dir, text_encoder_2=t5, text_encoder_2_checkpoint=t5_checkpoint)


def _scheduler_shift(model_dir: Path) -> bool | None:
    """`use_dynamic_shifting` from scheduler/scheduler_config.json, or None when there is none."""
    path = model_dir / "scheduler" / "scheduler_config.json"
    return bool(json.loads(path.read_text()).get("use_dynamic_shifting", False)) if path.is_file() else None


def _checkpoints_by_part(checkpoint: str | Path | Sequence[str | Path] | None) -> dict[str, Path]:
    """{part: checkpoint path} as each given checkpoint's metadata names it (one whose metadata
    cannot be read counts as the transformer's: loading it then says what is wrong, after checking
    its files); two for one part are refused."""
    if checkpoint is None:
        return {}
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    by_part: dict[str, Path] = {}
    for path in map(user_path, paths):
        part = stored_part(path) or "transformer"
        if part in by_part:
            raise ValueError(f"two checkpoints for the {part}: {by_part[part]} and {path}")
        by_part[part] = path
    return by_part


def _describe_checkpoint(path: Path, metadata: dict) -> str:
    """"checkpoint PATH (w4a4 + w4a16, group 256, regular Hadamard)", or "(bf16)"."""
    quantization = metadata.get("quantization")
    if not quantization:
        return f"checkpoint {path} (bf16)"
    treatments = dict.fromkeys(t for _, t in quantization["policy"]["rules"] if t != "bf16")
    return (f"checkpoint {path} ({' + '.join(treatments) or 'bf16'}, group {quantization['group_size']}, "
            f"{quantization['hadamard']} Hadamard)")


def _require_same_model(checkpoint: Path, folder: Path, config, from_folder_config) -> None:
    """Raises `PipelineMismatchError` naming the fields when `folder`'s config.json (if any) describes
    another model than the checkpoint's `config`."""
    path = folder / "config.json"
    if not path.is_file():
        return
    folder_config = from_folder_config(json.loads(path.read_text()))
    if folder_config != config:
        diff = {k: (v, config.to_dict()[k]) for k, v in folder_config.to_dict().items() if config.to_dict()[k] != v}
        raise PipelineMismatchError(
            f"checkpoint {checkpoint} is for another model than {folder.parent}: "
            + ", ".join(f"{k}: folder {a} vs checkpoint {b}" for k, (a, b) in diff.items())
        )


def _load_transformer(model_dir: Path, checkpoint: Path | None, dtype, verify: bool) -> tuple[nnx.Module, dict[str, str]]:
    """(the transformer, {"transformer": where it came from})."""
    folder_config_path = model_dir / "transformer" / "config.json"
    if checkpoint is None:
        if not folder_config_path.is_file():
            raise FileNotFoundError(
                f"model folder {model_dir} has no transformer/config.json: pass --checkpoint, or use a full diffusers FLUX folder"
            )
        return load_transformer(model_dir / "transformer", dtype=dtype), {
            "transformer": f"{model_dir / 'transformer'} ({jnp.dtype(dtype).name})"}

    transformer, metadata = load_checkpoint(checkpoint, verify=verify, part="transformer")
    _require_same_model(checkpoint, model_dir / "transformer", transformer.config, FluxConfig.from_diffusers_config)
    return transformer, {"transformer": _describe_checkpoint(checkpoint, metadata)}


def png_metadata(prompt: str, seed: int, settings: GenerationSettings, **extra: str) -> PngImagePlugin.PngInfo:
    """Text chunks: prompt, seed, each setting, any `extra` (model, checkpoint), and all of it as JSON."""
    fields = {"prompt": prompt, **dataclasses.asdict(settings), "seed": seed, **extra}
    info = PngImagePlugin.PngInfo()
    for key, value in fields.items():
        info.add_itxt(key, str(value))
    info.add_itxt("parameters", json.dumps(fields))
    return info


def save_png(image: np.ndarray, path: str | Path, prompt: str, seed: int, settings: GenerationSettings, **extra: str) -> Path:
    """Writes one uint8 (H, W, 3) image with its prompt, seed and settings in the PNG's text
    chunks, never over an existing file: `name.png` taken, it writes `name-1.png`, `name-2.png`, ...
    Returns the path written. A file is whole or absent: Ctrl-C waits for the image being written,
    and a failed write removes its file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count():
        candidate = path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        with interrupts.deferred():
            try:
                f = open(candidate, "xb")  # exclusive: a concurrent run cannot take it too
            except FileExistsError:
                continue
            try:
                with f:
                    Image.fromarray(image).save(f, format="PNG", pnginfo=png_metadata(prompt, seed, settings, **extra))
            except BaseException:
                candidate.unlink(missing_ok=True)
                raise
        return candidate
    raise AssertionError("unreachable")


def image_filename(index: int, prompt: str, seed: int) -> str:
    """`0003-a-cat-on-a-chair-s42.png`: index, a slug of the prompt (40 chars), seed."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40].strip("-") or "empty"
    return f"{index:04d}-{slug}-s{seed}.png"
