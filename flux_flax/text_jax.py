"""FLUX's text encoders in JAX: the Flax NNX ports of CLIP-L (`flux_flax.clip`) and T5-XXL
(`flux_flax.t5`) behind the same `encode(prompts) -> PromptEmbeds` as the PyTorch backend
(`flux_flax.text.TextEncoders`), sharing its tokenizers, truncation warning and embedding cache.
Each forward is one jitted program per batch size (the lengths are fixed: CLIP's 77 tokens, the
T5 length). Nothing here imports torch."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_flax.clip import CLIPTextModel
from flux_flax.layers import Dtype
from flux_flax.t5 import T5EncoderModel
from flux_flax.text import TEXT_PARTS, PromptEncoder, _require_parts, cache_key, dtype_name, load_tokenizer
from flux_flax.text_loading import load_clip, load_t5


def _clip_pooled(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(input_ids)[1]


def _t5_embeds(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(input_ids)


class JaxTextEncoders(PromptEncoder):
    """CLIP (pooled) + T5 prompt encoder on JAX's default device; `encode(prompts)` -> `PromptEmbeds`.

    As diffusers' FluxPipeline, both models see the padded ids without an attention mask."""

    def __init__(
        self,
        tokenizer,
        text_encoder: CLIPTextModel,
        tokenizer_2,
        text_encoder_2: T5EncoderModel,
        *,
        max_sequence_length: int = 512,
        cache_dir: str | Path | None = None,
        cache_key: str | None = None,
    ):
        super().__init__(tokenizer, tokenizer_2, max_sequence_length=max_sequence_length, cache_dir=cache_dir,
                         cache_key=cache_key)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self._clip = jax.jit(_clip_pooled, static_argnums=0)
        self._t5 = jax.jit(_t5_embeds, static_argnums=0)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        max_sequence_length: int = 512,
        dtype: Dtype | str = jnp.bfloat16,
        cache_dir: str | Path | None = None,
        text_encoder_2: T5EncoderModel | None = None,
        text_encoder_2_checkpoint: str | Path | None = None,
    ) -> "JaxTextEncoders":
        """Loads tokenizer/, text_encoder/ (CLIP), tokenizer_2/, text_encoder_2/ (T5) from a diffusers
        folder; weights in `dtype` (a jnp dtype or its name; T5's `wo` stays float32 in float16).
        `text_encoder_2`: a T5 already loaded (e.g. a 4-bit checkpoint's, kept in its own dtype)
        instead of the folder's, then not needed; `text_encoder_2_checkpoint`, its folder, identifies
        it in the embedding cache's key."""
        model_dir = Path(model_dir)
        parts = [p for p in TEXT_PARTS if text_encoder_2 is None or p != "text_encoder_2"]
        _require_parts(model_dir, parts)
        name = dtype_name(dtype)
        if text_encoder_2 is None:
            text_encoder_2 = load_t5(model_dir / "text_encoder_2", dtype=jnp.dtype(name))
        elif cache_dir is not None and text_encoder_2_checkpoint is None:
            raise ValueError("an embedding cache with a given text_encoder_2 needs its checkpoint folder to identify it")
        folders = [model_dir / p for p in parts]
        if text_encoder_2_checkpoint is not None:
            folders.append(Path(text_encoder_2_checkpoint))
        return cls(
            load_tokenizer(model_dir / "tokenizer"),
            load_clip(model_dir / "text_encoder", dtype=jnp.dtype(name)),
            load_tokenizer(model_dir / "tokenizer_2"),
            text_encoder_2,
            max_sequence_length=max_sequence_length,
            cache_dir=cache_dir,
            cache_key=cache_key(folders, "jax", name) if cache_dir is not None else None,
        )

    def _run(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pooled = self._clip(*nnx.split(self.text_encoder), jnp.asarray(clip_ids, jnp.int32))
        embeds = self._t5(*nnx.split(self.text_encoder_2), jnp.asarray(t5_ids, jnp.int32))
        return np.asarray(embeds.astype(jnp.float32)), np.asarray(pooled.astype(jnp.float32))
