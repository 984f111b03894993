"""Per-module numerics against diffusers, float32: double block, single block, RoPE, embeddings,
output norm. Each builds the torch module with random weights, copies them, and asserts
max|diff| / max|ref| within the float32 bound of the module's reductions
(`flux_fixtures.float32_tolerance`)."""

import flux_fixtures
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models import embeddings as dembed
from diffusers.models import normalization as dnorm
from diffusers.models.transformers import transformer_flux as dflux
from flax import nnx

from flux_flax import FluxSingleTransformerBlock, FluxTransformerBlock
from flux_flax import layers

DIM, HEADS, HEAD_DIM, AXES = 64, 2, 32, (8, 8, 16)
B, S_TXT, H, W = 2, 5, 3, 4


def randomize_norms(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm_" in name:
                p.normal_(1.0, 0.1)
    return module.eval()


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, np.float32))


@pytest.fixture
def rng():
    torch.manual_seed(0)
    return np.random.default_rng(0)


@pytest.fixture
def rope():
    ids = np.concatenate([np.zeros((S_TXT, 3), np.float32), flux_fixtures.image_ids(H, W)])
    cos, sin = dflux.FluxPosEmbed(10000, list(AXES))(t(ids))
    return (cos, sin), (jnp.asarray(cos.numpy()), jnp.asarray(sin.numpy()))


@pytest.mark.parametrize("torch_cls,flax_cls", [
    (dflux.FluxTransformerBlock, FluxTransformerBlock),
    (dflux.FluxSingleTransformerBlock, FluxSingleTransformerBlock),
], ids=["double", "single"])
def test_block(rng, rope, torch_cls, flax_cls):
    ref = randomize_norms(torch_cls(DIM, HEADS, HEAD_DIM))
    block = flax_cls(DIM, HEADS, HEAD_DIM, dtype=jnp.float32, rngs=nnx.Rngs(0))
    flux_fixtures.copy_torch_weights(block, ref)
    hs, ehs, temb = (rng.standard_normal(s, np.float32) for s in ((B, H * W, DIM), (B, S_TXT, DIM), (B, DIM)))
    with torch.no_grad():
        ref_txt, ref_img = ref(t(hs), t(ehs), t(temb), image_rotary_emb=rope[0])
    txt, img = block(jnp.asarray(hs), jnp.asarray(ehs), jnp.asarray(temb), rope[1])
    tol = flux_fixtures.float32_tolerance(
        *flux_fixtures.block_reductions(DIM, HEAD_DIM, S_TXT + H * W, single=flax_cls is FluxSingleTransformerBlock))
    assert flux_fixtures.relative_error(img, ref_img.numpy()) <= tol
    assert flux_fixtures.relative_error(txt, ref_txt.numpy()) <= tol


def test_rope_tables_and_rotation(rng):
    """FLUX.1's axes on a 64 x 96 grid (positions up to 95, frequencies up to 1): diffusers forms
    angles in float64, we in float32, so the tables differ by up to one float32 ulp of the largest
    angle (sin and cos have slope <= 1), plus their own rounding."""
    axes = (16, 56, 56)
    ids = np.concatenate([np.zeros((7, 3), np.float32), flux_fixtures.image_ids(64, 96)])
    ref_cos, ref_sin = dflux.FluxPosEmbed(10000, list(axes))(t(ids))
    cos, sin = layers.FluxPosEmbed(10000, axes)(jnp.asarray(ids))
    assert cos.shape == sin.shape == (7 + 64 * 96, 128) and cos.dtype == jnp.float32
    table_bound = flux_fixtures.float32_tolerance(1, angle=95.0)
    assert np.max(np.abs(np.asarray(cos) - ref_cos.numpy())) <= table_bound
    assert np.max(np.abs(np.asarray(sin) - ref_sin.numpy())) <= table_bound

    x = rng.standard_normal((2, ids.shape[0], 3, 128), np.float32)  # (B, S, heads, D)
    ref = dembed.apply_rotary_emb(t(x), (ref_cos, ref_sin), sequence_dim=1)
    out = layers.apply_rotary_emb(jnp.asarray(x), (jnp.asarray(ref_cos.numpy()), jnp.asarray(ref_sin.numpy())))
    assert flux_fixtures.relative_error(out, ref.numpy()) <= flux_fixtures.float32_tolerance(2)  # x*cos + x'*sin


@pytest.mark.parametrize("guidance", [True, False])
def test_time_text_embedding(rng, guidance):
    cls = dembed.CombinedTimestepGuidanceTextProjEmbeddings if guidance else dembed.CombinedTimestepTextProjEmbeddings
    ref = cls(embedding_dim=DIM, pooled_projection_dim=32).eval()
    emb = layers.CombinedTimestepTextProjEmbeddings(DIM, 32, guidance_embeds=guidance, dtype=jnp.float32,
                                                    rngs=nnx.Rngs(0))
    flux_fixtures.copy_torch_weights(emb, ref)
    timestep = np.array([0.25, 0.9], np.float32) * 1000
    g = np.array([3.5, 1.0], np.float32) * 1000
    pooled = rng.standard_normal((2, 32), np.float32)
    with torch.no_grad():
        expected = ref(t(timestep), t(g), t(pooled)) if guidance else ref(t(timestep), t(pooled))
    out = emb(jnp.asarray(timestep), jnp.asarray(pooled), jnp.asarray(g) if guidance else None)
    # Angles reach t * 1 rad (3500 for the guidance), evaluated to one float32 ulp; then the
    # sinusoid (256) -> linear -> SiLU -> linear (DIM) MLPs, their sum and the text MLP.
    tol = flux_fixtures.float32_tolerance(256, DIM, 32, DIM, 2, angle=float(np.max(g if guidance else timestep)))
    assert flux_fixtures.relative_error(out, expected.numpy()) <= tol

    # The raw sinusoid: angles reach 900 rad, where one float32 ulp is 6.1e-5, and XLA's and
    # torch's exp differ in the last bit, which moves an angle by up to that ulp.
    sinusoid = dembed.get_timestep_embedding(t(timestep), 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    out = layers.get_timestep_embedding(jnp.asarray(timestep), 256)
    bound = flux_fixtures.float32_tolerance(1, angle=float(np.max(timestep)))
    assert np.max(np.abs(np.asarray(out) - sinusoid.numpy())) <= bound


def test_output_norm(rng):
    ref = dnorm.AdaLayerNormContinuous(DIM, DIM, elementwise_affine=False, eps=1e-6).eval()
    norm = layers.AdaLayerNormContinuous(DIM, DIM, dtype=jnp.float32, rngs=nnx.Rngs(0))
    flux_fixtures.copy_torch_weights(norm, ref)
    x, cond = rng.standard_normal((B, 6, DIM), np.float32), rng.standard_normal((B, DIM), np.float32)
    with torch.no_grad():
        expected = ref(t(x), t(cond))
    tol = flux_fixtures.float32_tolerance(DIM, 2 * DIM)  # modulation linear, LayerNorm statistics
    assert flux_fixtures.relative_error(norm(jnp.asarray(x), jnp.asarray(cond)), expected.numpy()) <= tol
