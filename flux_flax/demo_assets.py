"""Tiny random-weight stand-ins for FLUX's text side, built in code (no model hub): byte-level BPE
tokenizers trained on a few sentences with the `tokenizers` library, and CLIP / T5 encoders with
the widths the transformer expects: the Flax NNX ports (`tiny_jax_text_encoders`, what
`convrot-flux demo` runs: no torch) or transformers' PyTorch models (`tiny_text_encoders`, for the
tests' references; torch is imported when they are built). `save_text_parts` writes the PyTorch
ones in diffusers' folder layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import jax.numpy as jnp
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders, trainers
from transformers import PreTrainedTokenizerFast

from flux_flax import clip as flax_clip
from flux_flax import t5 as flax_t5
from flux_flax.text import TextEncoders
from flux_flax.text_jax import JaxTextEncoders

if TYPE_CHECKING:
    from transformers import CLIPTextModel, T5EncoderModel

CLIP_MAX_LENGTH = 77
_CORPUS = [
    "a photo of a cat sitting on a red chair next to the window",
    "an astronaut riding a horse on the moon, digital art",
    "a watercolor painting of mountains at sunset with a lake",
    "portrait of an old man with a beard, studio lighting, 85mm",
    "a bowl of fruit: apples, oranges and bananas on a wooden table",
    "the city skyline at night, neon lights, rain, cinematic",
    "a small robot reading a book in a library, highly detailed",
]


def _bpe(special_tokens: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer)
    return tokenizer


def tiny_clip_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """CLIP-like: `<|startoftext|> ... <|endoftext|>`, padded with `<|endoftext|>` to 77 tokens."""
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tokenizer = _bpe([bos, eos], vocab_size)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=eos, unk_token=eos,
        model_max_length=CLIP_MAX_LENGTH,
    )


def tiny_t5_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """T5-like: `... </s>`, padded with `<pad>` (id 0)."""
    tokenizer = _bpe(["<pad>", "</s>", "<unk>"], vocab_size)
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
    )


def _clip_config(tokenizer: PreTrainedTokenizerFast, width: int, num_layers: int) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=num_layers,
                num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, eos_token_id=tokenizer.eos_token_id)


def _t5_config(tokenizer: PreTrainedTokenizerFast, width: int, num_layers: int, d_ff: int | None) -> dict:
    heads = 4
    return dict(vocab_size=len(tokenizer), d_model=width, d_kv=width // heads, d_ff=d_ff or 2 * width,
                num_layers=num_layers, num_heads=heads, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")


def tiny_clip(tokenizer: PreTrainedTokenizerFast, width: int, *, num_layers: int = 2, seed: int = 0) -> "CLIPTextModel":
    """A random CLIP text model (transformers, PyTorch) whose pooled output is `width` wide (FLUX.1: 768)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(**_clip_config(tokenizer, width, num_layers), projection_dim=width,
                            bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config).eval()


def tiny_t5(tokenizer: PreTrainedTokenizerFast, width: int, *, num_layers: int = 2, d_ff: int | None = None,
            seed: int = 0) -> "T5EncoderModel":
    """A random T5 v1.1-style (gated-GELU) encoder (transformers, PyTorch) whose token embeddings are
    `width` wide (FLUX.1: 4096)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed + 1)
    config = T5Config(**_t5_config(tokenizer, width, num_layers, d_ff), is_encoder_decoder=False,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def tiny_jax_text_encoders(clip_width: int, t5_width: int, *, max_sequence_length: int = 512,
                           t5_d_ff: int | None = None, num_layers: int = 2, seed: int = 0,
                           dtype=jnp.float32) -> JaxTextEncoders:
    """Both random encoders as the Flax NNX ports (the configs of `tiny_clip` / `tiny_t5`, Flax's
    initialisers), with their tokenizers, ready to `encode` prompts; torch is not imported."""
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    clip_config = flax_clip.CLIPTextConfig(**_clip_config(clip_tok, clip_width, num_layers))
    t5_config = flax_t5.T5Config(**_t5_config(t5_tok, t5_width, num_layers, t5_d_ff))
    return JaxTextEncoders(
        clip_tok, flax_clip.CLIPTextModel(clip_config, dtype=dtype, rngs=nnx.Rngs(seed)),
        t5_tok, flax_t5.T5EncoderModel(t5_config, dtype=dtype, rngs=nnx.Rngs(seed + 1)),
        max_sequence_length=max_sequence_length,
    )


def tiny_text_encoders(clip_width: int, t5_width: int, *, max_sequence_length: int = 512, t5_d_ff: int | None = None,
                       num_layers: int = 2, seed: int = 0) -> TextEncoders:
    """Both random encoders (transformers, PyTorch) with their tokenizers, ready to `encode` prompts."""
    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    return TextEncoders(
        clip_tok, tiny_clip(clip_tok, clip_width, num_layers=num_layers, seed=seed),
        t5_tok, tiny_t5(t5_tok, t5_width, num_layers=num_layers, d_ff=t5_d_ff, seed=seed),
        max_sequence_length=max_sequence_length,
    )


def save_text_parts(encoders: TextEncoders, model_dir: str | Path) -> None:
    """Writes tokenizer/, text_encoder/, tokenizer_2/, text_encoder_2/ as a diffusers FLUX folder holds them."""
    model_dir = Path(model_dir)
    encoders.tokenizer.save_pretrained(model_dir / "tokenizer")
    encoders.text_encoder.save_pretrained(model_dir / "text_encoder")
    encoders.tokenizer_2.save_pretrained(model_dir / "tokenizer_2")
    encoders.text_encoder_2.save_pretrained(model_dir / "text_encoder_2")
