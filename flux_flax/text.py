"""FLUX's two text encoders, run in PyTorch through `transformers` (which no longer ships Flax
models): CLIP-L gives the pooled prompt vector (768 wide), T5-XXL the per-token prompt embeddings
(4096 wide; 512 tokens for dev, 256 for schnell). They run once per prompt, so their cost is small
next to the denoising loop; results go to JAX as float32 numpy arrays, optionally cached on disk.

Mirrors `FluxPipeline._get_clip_prompt_embeds` / `_get_t5_prompt_embeds`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase, T5EncoderModel

TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


@dataclasses.dataclass(frozen=True)
class PromptEmbeds:
    """T5 token embeddings (B, max_sequence_length, joint_dim) and CLIP pooled (B, pooled_dim), float32."""

    prompt_embeds: np.ndarray
    pooled_prompt_embeds: np.ndarray


def _require_parts(model_dir: Path, parts: Sequence[str]) -> None:
    for part in parts:
        if not (model_dir / part).is_dir():
            raise FileNotFoundError(
                f"model folder {model_dir} has no {part}/ (a diffusers-format FLUX folder holds {', '.join(TEXT_PARTS)}, vae/)"
            )


def _fingerprint(folders: Sequence[Path]) -> str:
    """Identifies the encoders' files (configs and weight sizes/mtimes) for the embedding cache."""
    h = hashlib.sha256()
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{folder.name}/{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class TextEncoders:
    """CLIP (pooled) + T5 prompt encoder; `encode(prompts)` -> `PromptEmbeds`.

    With `cache_dir`, embeddings are stored per prompt in `<cache_dir>/<sha256>.npz`, keyed on the
    prompt, the T5 length and `cache_key` (a fingerprint of the encoder files).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: CLIPTextModel,
        tokenizer_2: PreTrainedTokenizerBase,
        text_encoder_2: T5EncoderModel,
        *,
        max_sequence_length: int = 512,
        cache_dir: str | Path | None = None,
        cache_key: str | None = None,
    ):
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        if cache_dir is not None and cache_key is None:
            raise ValueError("an embedding cache needs a cache_key identifying the encoders")
        self.tokenizer, self.text_encoder = tokenizer, text_encoder.eval()
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2.eval()
        self.max_sequence_length = max_sequence_length
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_key = cache_key

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        max_sequence_length: int = 512,
        dtype: torch.dtype = torch.bfloat16,
        device: str = "cpu",
        cache_dir: str | Path | None = None,
    ) -> "TextEncoders":
        """Loads tokenizer/, text_encoder/ (CLIP), tokenizer_2/, text_encoder_2/ (T5) from a diffusers folder."""
        model_dir = Path(model_dir)
        _require_parts(model_dir, TEXT_PARTS)
        kwargs = dict(dtype=dtype)
        return cls(
            AutoTokenizer.from_pretrained(model_dir / "tokenizer"),
            CLIPTextModel.from_pretrained(model_dir / "text_encoder", **kwargs).to(device),
            AutoTokenizer.from_pretrained(model_dir / "tokenizer_2"),
            T5EncoderModel.from_pretrained(model_dir / "text_encoder_2", **kwargs).to(device),
            max_sequence_length=max_sequence_length,
            cache_dir=cache_dir,
            cache_key=_fingerprint([model_dir / p for p in TEXT_PARTS]) if cache_dir is not None else None,
        )

    def _tokenize(self, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int) -> torch.Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
        full_lengths = [len(x) for x in tokenizer(prompts).input_ids]
        for prompt, n in zip(prompts, full_lengths):
            if n > max_length:
                warnings.warn(f"prompt truncated to {max_length} tokens (it has {n}): {prompt[:60]!r}...", stacklevel=3)
        return ids

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        device = self.text_encoder.device
        clip_ids = self._tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length)
        pooled = self.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
        t5_ids = self._tokenize(self.tokenizer_2, prompts, self.max_sequence_length)
        embeds = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device), output_hidden_states=False)[0]
        return PromptEmbeds(embeds.float().cpu().numpy(), pooled.float().cpu().numpy())

    def _cache_path(self, prompt: str) -> Path:
        key = json.dumps([self.cache_key, self.max_sequence_length, prompt])
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()}.npz"

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Embeds `prompts` (a non-empty list of strings), reading and filling the cache if one is set."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode: the prompt list is empty")
        if self.cache_dir is None:
            return self._encode(prompts)
        cached: dict[str, PromptEmbeds] = {}
        for prompt in dict.fromkeys(prompts):
            path = self._cache_path(prompt)
            if path.is_file():
                with np.load(path) as f:
                    cached[prompt] = PromptEmbeds(f["prompt_embeds"], f["pooled_prompt_embeds"])
        missing = [p for p in dict.fromkeys(prompts) if p not in cached]
        if missing:
            fresh = self._encode(missing)
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for i, prompt in enumerate(missing):
                cached[prompt] = PromptEmbeds(fresh.prompt_embeds[i : i + 1], fresh.pooled_prompt_embeds[i : i + 1])
                tmp = self._cache_path(prompt).with_suffix(".tmp.npz")
                np.savez(tmp, **dataclasses.asdict(cached[prompt]))
                tmp.replace(self._cache_path(prompt))
        return PromptEmbeds(
            np.concatenate([cached[p].prompt_embeds for p in prompts]),
            np.concatenate([cached[p].pooled_prompt_embeds for p in prompts]),
        )
