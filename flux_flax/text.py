"""FLUX's two text encoders: CLIP-L gives the pooled prompt vector (768 wide), T5-XXL the per-token
prompt embeddings (4096 wide; 512 tokens for dev, 256 for schnell). They run once per prompt, so
their cost is small next to the denoising loop; results are float32 numpy arrays, optionally
cached on disk.

`PromptEncoder` holds what both backends share: transformers' fast tokenizers (to numpy), the
truncation warning, the embedding cache. Two backends run the models: `TextEncoders` here, in
PyTorch through `transformers` (torch is imported only when it is used), and
`flux_flax.text_jax.JaxTextEncoders`, the Flax NNX ports (`flux_flax.clip`, `flux_flax.t5`).

Mirrors `FluxPipeline._get_clip_prompt_embeds` / `_get_t5_prompt_embeds`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flux_flax import interrupts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


def cache_key(folders: Sequence[Path], backend: str, dtype: str) -> str:
    """The embedding cache's key: the fingerprint of the encoders' folders (tokenizers, weights or a
    checkpoint, whose integrity manifest holds its arrays' digests), the backend and the dtype."""
    return f"{_fingerprint([Path(f) for f in folders])}:{backend}:{dtype}"


def dtype_name(dtype) -> str:
    """"bfloat16" for "bfloat16", jnp.bfloat16, numpy's or torch's bfloat16: one spelling for either backend."""
    if isinstance(dtype, str):
        return dtype.removeprefix("torch.")
    if str(dtype).startswith("torch."):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def load_tokenizer(folder: Path) -> "PreTrainedTokenizerBase":
    """transformers' fast tokenizer of a diffusers `tokenizer/` folder, without `AutoTokenizer`
    (which imports torch): CLIPTokenizer / T5Tokenizer as tokenizer_config.json names them (both
    build from vocab files too), otherwise PreTrainedTokenizerFast over tokenizer.json."""
    import transformers

    config_path = Path(folder) / "tokenizer_config.json"
    name = json.loads(config_path.read_text()).get("tokenizer_class", "") if config_path.is_file() else ""
    name = (name or "").removesuffix("Fast")
    cls = getattr(transformers, name) if name in ("CLIPTokenizer", "T5Tokenizer") else transformers.PreTrainedTokenizerFast
    return cls.from_pretrained(folder)


class PromptEncoder:
    """CLIP (pooled) + T5 prompt encoder; `encode(prompts)` -> `PromptEmbeds`. Subclasses run the
    two models (`_run`); tokenizing, the truncation warning and the cache are here.

    With `cache_dir`, embeddings are stored per prompt in `<cache_dir>/<sha256>.npz`, keyed on the
    prompt, the T5 length and `cache_key` (a fingerprint of the encoder files, the backend and dtype).
    """

    def __init__(
        self,
        tokenizer: "PreTrainedTokenizerBase",
        tokenizer_2: "PreTrainedTokenizerBase",
        *,
        max_sequence_length: int = 512,
        cache_dir: str | Path | None = None,
        cache_key: str | None = None,
    ):
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in [1, 512], got {max_sequence_length}")
        if cache_dir is not None and cache_key is None:
            raise ValueError("an embedding cache needs a cache_key identifying the encoders")
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.max_sequence_length = max_sequence_length
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_key = cache_key

    def _tokenize(self, tokenizer: "PreTrainedTokenizerBase", prompts: list[str], max_length: int) -> np.ndarray:
        """(B, max_length) int64 ids, padded and truncated; warns for each truncated prompt."""
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np").input_ids
        full_lengths = [len(x) for x in tokenizer(prompts).input_ids]
        for prompt, n in zip(prompts, full_lengths):
            if n > max_length:
                warnings.warn(f"prompt truncated to {max_length} tokens (it has {n}): {prompt[:60]!r}...", stacklevel=3)
        return np.asarray(ids, np.int64)

    def _run(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(T5 embeddings (B, L, d_model), CLIP pooled (B, hidden)) as float32 numpy."""
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        clip_ids = self._tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length)
        t5_ids = self._tokenize(self.tokenizer_2, prompts, self.max_sequence_length)
        embeds, pooled = self._run(clip_ids, t5_ids)
        return PromptEmbeds(np.asarray(embeds, np.float32), np.asarray(pooled, np.float32))

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
                with interrupts.deferred():  # an entry is whole or absent
                    try:
                        np.savez(tmp, **dataclasses.asdict(cached[prompt]))
                        tmp.replace(self._cache_path(prompt))
                    finally:
                        tmp.unlink(missing_ok=True)
        return PromptEmbeds(
            np.concatenate([cached[p].prompt_embeds for p in prompts]),
            np.concatenate([cached[p].pooled_prompt_embeds for p in prompts]),
        )


class TextEncoders(PromptEncoder):
    """The PyTorch backend: transformers' CLIPTextModel and T5EncoderModel."""

    def __init__(
        self,
        tokenizer: "PreTrainedTokenizerBase",
        text_encoder,
        tokenizer_2: "PreTrainedTokenizerBase",
        text_encoder_2,
        *,
        max_sequence_length: int = 512,
        cache_dir: str | Path | None = None,
        cache_key: str | None = None,
    ):
        super().__init__(tokenizer, tokenizer_2, max_sequence_length=max_sequence_length, cache_dir=cache_dir,
                         cache_key=cache_key)
        self.text_encoder, self.text_encoder_2 = text_encoder.eval(), text_encoder_2.eval()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        max_sequence_length: int = 512,
        dtype=None,
        device: str = "cpu",
        cache_dir: str | Path | None = None,
    ) -> "TextEncoders":
        """Loads tokenizer/, text_encoder/ (CLIP), tokenizer_2/, text_encoder_2/ (T5) from a diffusers
        folder; `dtype` (default bfloat16) as a torch dtype or its name."""
        import torch
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        model_dir = Path(model_dir)
        _require_parts(model_dir, TEXT_PARTS)
        name = dtype_name(dtype or "bfloat16")
        kwargs = dict(dtype=getattr(torch, name))
        return cls(
            AutoTokenizer.from_pretrained(model_dir / "tokenizer"),
            CLIPTextModel.from_pretrained(model_dir / "text_encoder", **kwargs).to(device),
            AutoTokenizer.from_pretrained(model_dir / "tokenizer_2"),
            T5EncoderModel.from_pretrained(model_dir / "text_encoder_2", **kwargs).to(device),
            max_sequence_length=max_sequence_length,
            cache_dir=cache_dir,
            cache_key=cache_key([model_dir / p for p in TEXT_PARTS], "torch", name) if cache_dir is not None else None,
        )

    def _run(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.no_grad():
            clip = torch.from_numpy(clip_ids).to(self.text_encoder.device)
            pooled = self.text_encoder(clip, output_hidden_states=False).pooler_output
            t5 = torch.from_numpy(t5_ids).to(self.text_encoder_2.device)
            embeds = self.text_encoder_2(t5, output_hidden_states=False)[0]
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()
