"""Sequence parallelism (DeepSpeed-Ulysses): one image's text and image tokens split over the
"sequence" axis of a device mesh.

Every op of the FLUX transformer but attention works token by token (linears and the W4A4
kernels with their per-token scales, norms, AdaLN modulation, RoPE, MLP, the Euler step), so each
device runs them unchanged on its own slice of the tokens. Attention needs every key: an
all-to-all turns the token shards of q, k and v into head shards (each device then holds every
token of heads / n heads), the attention implementation runs unchanged on those, and a second
all-to-all turns its output back into token shards. Everything runs inside one `jax.shard_map`
over the whole denoising loop; the collectives are `jax.lax.all_to_all`, nothing hand-written.

Ulysses rather than ring attention because FLUX's 24 heads divide over 2, 3, 4, 6 or 8 devices
and the attention then stays one unchanged call over the whole sequence (docs/design.md §6).

Token counts that do not divide by n are padded at the end of the text and of the image tokens.
The padding never reaches a real token: before the attention call it is cut out of the gathered
queries, keys and values (exactly what masking its keys would give, for any implementation, with
no mask), and zeros take its place in the output; everything else is token-local, and the padded
tokens are dropped from the result. RoPE ids are split with their tokens, so every token keeps its
position.

The model finds out that it runs sequence parallel from a `TokenLayout` set (at trace time) for
the duration of the loop (`token_layout`); `FluxAttention` routes its attention call through
`attention`, which is a plain call when no layout is set.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

DATA, SEQUENCE = "data", "sequence"

Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """How the joint sequence is split: `text_tokens` and `image_tokens` real tokens (the whole
    sequence's), each padded at its end to a multiple of `devices` and cut into equal contiguous
    slices; device j holds [text slice j, image slice j], in that order (FLUX's [text, image])."""

    text_tokens: int
    image_tokens: int
    devices: int

    @property
    def local_text(self) -> int:
        return -(-self.text_tokens // self.devices)

    @property
    def local_image(self) -> int:
        return -(-self.image_tokens // self.devices)


_LAYOUT: contextvars.ContextVar[TokenLayout | None] = contextvars.ContextVar("token_layout", default=None)


@contextlib.contextmanager
def token_layout(layout: TokenLayout) -> Iterator[None]:
    """Within this context (entered while tracing the body of a `shard_map` over SEQUENCE),
    `attention` gathers its tokens across the devices as `layout` says."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def active() -> bool:
    """Whether a `token_layout` is set: the model runs sequence parallel (q, k, v hold this
    device's tokens only)."""
    return _LAYOUT.get() is not None


def check_heads(heads: int, devices: int) -> None:
    """Raises a ValueError unless the attention heads divide over the sequence-parallel devices."""
    if heads % devices:
        raise ValueError(
            f"sequence parallel over {devices} devices splits the attention heads across them, "
            f"but the model's {heads} heads do not divide by {devices}"
        )


def attention(attend: Attend, query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """`attend(query, key, value)` over (B, S, H, D) arrays, S the joint [text, image] tokens.

    Outside a `token_layout`, a plain call. Within one, the arrays hold this device's tokens
    only: an all-to-all gives each device every real token of H / n heads (in the unsplit
    order, the padding cut out), `attend` runs on those, and the reverse all-to-all returns this
    device's tokens with every head."""
    layout = _LAYOUT.get()
    if layout is None:
        return attend(query, key, value)
    n, text, image = layout.devices, layout.local_text, layout.local_image
    batch, tokens, heads, _ = query.shape
    check_heads(heads, n)
    if tokens != text + image:
        raise ValueError(
            f"sequence-parallel attention got {tokens} tokens on this device, but the layout {layout} "
            f"puts {text} text + {image} image tokens on each"
        )

    def all_tokens(x: jax.Array) -> jax.Array:  # (B, text + image, H, D) -> (B, real tokens, H / n, D)
        x = jax.lax.all_to_all(x, SEQUENCE, split_axis=2, concat_axis=1, tiled=True)
        x = x.reshape(batch, n, text + image, *x.shape[2:])  # device-major
        text_part = x[:, :, :text].reshape(batch, n * text, *x.shape[3:])[:, :layout.text_tokens]
        image_part = x[:, :, text:].reshape(batch, n * image, *x.shape[3:])[:, :layout.image_tokens]
        return jnp.concatenate([text_part, image_part], axis=1)

    out = attend(all_tokens(query), all_tokens(key), all_tokens(value))

    def device_slices(x: jax.Array, padded: int) -> jax.Array:  # (B, real, h, D) -> (B, n, padded / n, h, D)
        x = jnp.pad(x, [(0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0)])
        return x.reshape(batch, n, padded // n, *x.shape[2:])

    out = jnp.concatenate([device_slices(out[:, :layout.text_tokens], n * text),
                           device_slices(out[:, layout.text_tokens:], n * image)], axis=2)
    out = out.reshape(batch, n * (text + image), *out.shape[3:])
    return jax.lax.all_to_all(out, SEQUENCE, split_axis=1, concat_axis=2, tiled=True)


def pad_tokens(x: jax.Array, axis: int, devices: int) -> jax.Array:
    """`x` zero-padded at the end of `axis` to a multiple of `devices`."""
    pad = -x.shape[axis] % devices
    return jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)]) if pad else x


def _once_per_step(on_step: Callable[[Any], None], devices: int) -> Callable[[Any], None]:
    """A host callback that each of `devices` devices calls once per step -> `on_step` called
    once per step (on every `devices`-th call)."""
    calls, lock = itertools.count(1), threading.Lock()

    def callback(value: Any) -> None:
        with lock:
            call = next(calls)
        if call % devices == 0:
            on_step(value)

    return callback


def denoise(loop: Callable[..., jax.Array], mesh: Mesh, state: Any, latents: jax.Array, prompt_embeds: jax.Array,
            pooled: jax.Array, img_ids: jax.Array, txt_ids: jax.Array, sigmas: jax.Array,
            guidance: jax.Array | None, on_step: Callable[[Any], None] | None = None) -> jax.Array:
    """Runs `loop(state, latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas, guidance,
    on_step)` (the denoising loop, e.g. `sampling.denoise` on the model merged from `state`)
    sequence parallel on `mesh` (axes DATA, SEQUENCE): the batch split over DATA (its size must
    divide by that axis), the tokens of latents, prompt embeddings and their RoPE ids padded and
    split over SEQUENCE, `state` (the model weights), `sigmas` replicated. Call it inside jit.
    Returns the final (B, image tokens, C) latents, the padding dropped."""
    n = mesh.shape[SEQUENCE]
    layout = TokenLayout(text_tokens=prompt_embeds.shape[1], image_tokens=latents.shape[1], devices=n)
    latents, prompt_embeds = pad_tokens(latents, 1, n), pad_tokens(prompt_embeds, 1, n)
    img_ids, txt_ids = pad_tokens(img_ids, 0, n), pad_tokens(txt_ids, 0, n)
    step_callback = None if on_step is None else _once_per_step(on_step, mesh.size)

    def local(state, latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas, guidance):
        with token_layout(layout):
            return loop(state, latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas, guidance, step_callback)

    tokens, rows, ids = P(DATA, SEQUENCE), P(DATA), P(SEQUENCE)
    sharded = jax.shard_map(
        local, mesh=mesh, out_specs=tokens,
        in_specs=(P(), tokens, tokens, rows, ids, ids, P(), None if guidance is None else rows),
    )
    return sharded(state, latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas, guidance)[:, :layout.image_tokens]
