"""The Flax NNX text encoders (flux_flax.clip, flux_flax.t5) against transformers' PyTorch models on
tiny random configs in float32, their loading from diffusers folders (and its errors), and the JAX
prompt encoder against the PyTorch one."""

import warnings

import flux_fixtures
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel as HFCLIPTextModel
from transformers import T5Config as HFT5Config
from transformers import T5EncoderModel as HFT5EncoderModel

from convrot_jax import ConvDense4bit, QuantPolicy
from flux_flax.clip import CLIPTextConfig
from flux_flax.demo_assets import (
    _CORPUS, CLIP_MAX_LENGTH, save_text_parts, tiny_clip, tiny_clip_tokenizer, tiny_t5, tiny_t5_tokenizer, tiny_text_encoders,
)
from flux_flax.errors import CheckpointError, MissingKeyError, ShapeMismatchError, UnexpectedKeyError
from flux_flax.policy import t5_default_policy
from flux_flax.quantize import quantize_model
from flux_flax.t5 import T5Config, relative_position_bucket
from flux_flax.text import TextEncoders
from flux_flax.text_jax import JaxTextEncoders
from flux_flax.text_loading import load_clip, load_t5

LONG = " ".join(["an astronaut riding a horse on the moon, digital art"] * 40)  # > 512 tokens
PROMPTS = ["a cat on a red chair", "", LONG]


def perturb_norms(model, seed=0):
    """Layer-norm weights around 1 and biases around 0 (transformers initializes ones / zeros), so
    that their mapping is tested too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
    return model


def clip_tolerance(config: CLIPTextConfig, length: int) -> float:
    d, head = config.hidden_size, config.hidden_size // config.num_attention_heads
    per_layer = (2 * d, d, head, length, length, d, 2 * d, d, config.intermediate_size)  # LN, qkv, QK, softmax, PV, out, LN, fc1, fc2
    return flux_fixtures.float32_tolerance(*per_layer * config.num_hidden_layers, 2 * d)


def t5_tolerance(config: T5Config, length: int) -> float:
    d, inner = config.d_model, config.num_heads * config.d_kv
    per_layer = (d, d, config.d_kv, length, length, inner, d, d, config.d_ff)  # norm, qkv, QK, softmax, PV, o, norm, wi, wo
    return flux_fixtures.float32_tolerance(*per_layer * config.num_layers, d)


def token_ids(tokenizer, max_length):
    out = tokenizer(PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return out.input_ids, out.attention_mask


# CLIP ------------------------------------------------------------------------------------------

def _hf_clip(eos_token_id=None, hidden_act="quick_gelu"):
    tokenizer = tiny_clip_tokenizer()
    model = tiny_clip(tokenizer, 32, num_layers=2)
    if eos_token_id is not None or hidden_act != "quick_gelu":
        config = model.config.to_dict()
        config.update(eos_token_id=eos_token_id or config["eos_token_id"], hidden_act=hidden_act)
        state = model.state_dict()
        model = HFCLIPTextModel(HFCLIPTextConfig(**config)).eval()
        model.load_state_dict(state)
    return tokenizer, perturb_norms(model)


@pytest.mark.parametrize("eos_token_id, hidden_act", [(None, "quick_gelu"), (2, "quick_gelu"), (None, "gelu")],
                         ids=["first-eos", "eos2-argmax", "gelu"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_clip_matches_transformers(tmp_path, eos_token_id, hidden_act, masked):
    tokenizer, ref = _hf_clip(eos_token_id, hidden_act)
    ref.save_pretrained(tmp_path)
    model = load_clip(tmp_path, dtype=jnp.float32)
    assert model.config.eos_token_id == ref.config.eos_token_id and model.config.hidden_act == hidden_act
    ids, mask = token_ids(tokenizer, CLIP_MAX_LENGTH)
    assert ids[2, -2] != tokenizer.pad_token_id  # the long prompt fills all 77 tokens (EOS last)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if masked else None)
    hidden, pooled = model(jnp.asarray(ids), jnp.asarray(mask) if masked else None)
    bound = clip_tolerance(model.config, CLIP_MAX_LENGTH)
    assert flux_fixtures.relative_error(hidden, out.last_hidden_state.numpy()) <= bound
    assert flux_fixtures.relative_error(pooled, out.pooler_output.numpy()) <= bound
    assert np.abs(np.asarray(pooled[0] - pooled[1])).max() > 1e-2  # the prompts differ


# T5 --------------------------------------------------------------------------------------------

def _hf_t5(xxl_heads: bool):
    tokenizer = tiny_t5_tokenizer()
    if not xxl_heads:
        return tokenizer, perturb_norms(tiny_t5(tokenizer, 32, num_layers=2))
    # T5-XXL's attention settings (32 buckets, max distance 128, heads of 64) at a small width.
    torch.manual_seed(3)
    config = HFT5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=64, d_ff=96, num_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return tokenizer, perturb_norms(HFT5EncoderModel(config).eval())


@pytest.mark.parametrize("xxl_heads, length", [(False, 24), (True, 300)], ids=["tiny", "xxl-heads"])
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_t5_matches_transformers(tmp_path, xxl_heads, length, masked):
    tokenizer, ref = _hf_t5(xxl_heads)
    ref.save_pretrained(tmp_path)
    model = load_t5(tmp_path, dtype=jnp.float32)
    assert model.config.dense_act_fn == "gelu_new" and model.config.is_gated_act
    assert model.encoder.embed_tokens is model.shared
    ids, mask = token_ids(tokenizer, length)
    assert (ids[1, 1:] == tokenizer.pad_token_id).all() and ids[2, -1] != tokenizer.pad_token_id
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask) if masked else None)[0].numpy()
    out = model(jnp.asarray(ids), jnp.asarray(mask) if masked else None)
    assert out.shape == expected.shape == (3, length, model.config.d_model)
    assert flux_fixtures.relative_error(out, expected) <= t5_tolerance(model.config, length)


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 128), (32, 16)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_transformers(num_buckets, max_distance, bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-1024, 1025)
    expected = T5Attention._relative_position_bucket(torch.from_numpy(relative), bidirectional=bidirectional,
                                                     num_buckets=num_buckets, max_distance=max_distance)
    ours = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=num_buckets,
                                    max_distance=max_distance)
    np.testing.assert_array_equal(ours, expected.numpy())


def test_t5_config_activation():
    assert T5Config(feed_forward_proj="gated-gelu").dense_act_fn == "gelu_new"  # as T5Config: the tanh GELU
    assert T5Config(feed_forward_proj="gated-gelu").is_gated_act
    assert T5Config(feed_forward_proj="relu").is_gated_act is False
    with pytest.raises(ValueError, match="not supported"):
        T5Config(feed_forward_proj="gated-swish")


# 4-bit T5 --------------------------------------------------------------------------------------

def _t5_256(folder):
    """T5-XXL's attention (heads of 64, 32 buckets, max distance 128) and gated-GELU FFN at widths
    that are multiples of the 256-wide rotation groups (d_model 256, d_ff 768), 4 blocks."""
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(5)
    config = HFT5Config(
        vocab_size=len(tokenizer), d_model=256, d_kv=64, d_ff=768, num_layers=4, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        is_encoder_decoder=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    perturb_norms(HFT5EncoderModel(config).eval()).save_pretrained(folder)
    return tokenizer


def _embedding_errors(out, ref):
    """(relative L2 over the whole prompt set, per-prompt relative L2, per-token cosine) of out vs ref."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    per_prompt = np.linalg.norm((out - ref).reshape(len(ref), -1), axis=1) / np.linalg.norm(ref.reshape(len(ref), -1), axis=1)
    cosine = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref), per_prompt, cosine


def test_4bit_t5_embeddings(tmp_path):
    """The quantized T5 against the float one on a prompt set (7 sentences, an empty prompt, one
    truncated), float32 activations, W4A16 (the default policy) and W4A4 (the same layers).

    The bound: a linear whose rotated weight carries a relative error e (its rounding: uniform
    within max|w_row| / 7 steps, about 0.13 at these widths; computed here from the weights) gives
    outputs off by about e relative for inputs spread over all channels, as rotated ones are.
    Independent errors add in quadrature along the deepest path: per block two linears in series
    on the attention's value path (v, o) and two on the FFN's (wi, wo), so each prompt's embeddings
    are within e_max * sqrt(4 * blocks) relative L2 (about 0.55 here). W4A4 quantizes the
    activations too, an error of the same order at every linear: its embeddings must be further off
    than W4A16's, which is why the policy keeps the activations in bf16 (besides T5's outliers)."""
    tokenizer = _t5_256(tmp_path)
    prompts = [*_CORPUS, "", LONG]
    ids = jnp.asarray(tokenizer(prompts, padding="max_length", max_length=64, truncation=True,
                                return_tensors="np").input_ids)
    float_model = load_t5(tmp_path, dtype=jnp.float32)
    ref = float_model(ids)
    policy = t5_default_policy()
    weight_errors = flux_fixtures.int4_weight_errors(float_model, policy)
    assert len(weight_errors) == 7 * 4  # q, k, v, o, wi_0, wi_1, wo in each block
    bound = max(weight_errors) * np.sqrt(4 * float_model.config.num_layers)
    errors = {}
    for treatment in ("w4a16", "w4a4"):
        rules = tuple((pattern, treatment) for pattern, _ in policy.rules)
        model = quantize_model(load_t5(tmp_path, dtype=jnp.float32), QuantPolicy(rules), implementation="xla")
        errors[treatment] = _embedding_errors(model(ids), ref)
    assert isinstance(model.encoder.block[3].layer[1].DenseReluDense.wo, ConvDense4bit)
    total, per_prompt, cosine = errors["w4a16"]
    print(f"W4A16 vs float: relative L2 {total:.3f} (per prompt max {per_prompt.max():.3f}), cosine min "
          f"{cosine.min():.4f} mean {cosine.mean():.4f}; W4A4: relative L2 {errors['w4a4'][0]:.3f}, cosine min "
          f"{errors['w4a4'][2].min():.4f} mean {errors['w4a4'][2].mean():.4f}; weight error max "
          f"{max(weight_errors):.3f}, bound {bound:.3f}")
    assert per_prompt.max() <= bound
    assert errors["w4a4"][0] > total


# Loading ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    encoders = tiny_text_encoders(32, 32, max_sequence_length=24)
    perturb_norms(encoders.text_encoder)
    perturb_norms(encoders.text_encoder_2)
    save_text_parts(encoders, folder)
    return folder


def _rewrite(folder, part, edit):
    path = folder / part / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return path


@pytest.fixture
def copy(text_folder, tmp_path):
    import shutil

    shutil.copytree(text_folder, tmp_path / "m")
    return tmp_path / "m"


def test_missing_key_is_named(copy):
    path = _rewrite(copy, "text_encoder_2", lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wi_0.weight"))
    with pytest.raises(MissingKeyError, match=r"encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_0\.weight") as e:
        load_t5(copy / "text_encoder_2", dtype=jnp.float32)
    assert str(path) in str(e.value)


def test_unexpected_key_is_named(copy):
    _rewrite(copy, "text_encoder", lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(UnexpectedKeyError, match="extra"):
        load_clip(copy / "text_encoder", dtype=jnp.float32)


def test_wrong_shape_is_named(copy):
    key = "encoder.layers.0.mlp.fc1.weight"
    _rewrite(copy, "text_encoder", lambda t: t.update({key: t[key][:, :16]}))
    with pytest.raises(ShapeMismatchError, match=rf"{key}: model expects \(64, 32\), checkpoint has \(64, 16\)"):
        load_clip(copy / "text_encoder", dtype=jnp.float32)


def test_integer_tensor_is_refused(copy):
    key = "final_layer_norm.bias"
    _rewrite(copy, "text_encoder", lambda t: t.update({key: t[key].astype(np.int32)}))
    with pytest.raises(CheckpointError, match=rf"not floating point: {key} \(I32\)"):
        load_clip(copy / "text_encoder", dtype=jnp.float32)


def test_truncated_file_is_named(copy):
    path = copy / "text_encoder_2" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=str(path)):
        load_t5(copy / "text_encoder_2", dtype=jnp.float32)


def test_missing_config_is_named(copy):
    (copy / "text_encoder" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(copy / "text_encoder")


def _params(model):
    from flux_flax.transformer import param_paths

    return {path: np.asarray(var[...]) for path, var in param_paths(model)}


def test_sharded_and_legacy_layouts_load_the_same(text_folder, tmp_path):
    """Shards + index; CLIP keys of transformers 4 (`text_model.` prefix, `position_ids` buffer);
    T5's tied embedding under both names."""
    clip = _params(load_clip(text_folder / "text_encoder", dtype=jnp.float32))
    t5 = _params(load_t5(text_folder / "text_encoder_2", dtype=jnp.float32))

    sharded = tmp_path / "sharded"
    HFT5EncoderModel.from_pretrained(text_folder / "text_encoder_2").save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert all(np.array_equal(v, t5[k]) for k, v in _params(load_t5(sharded, dtype=jnp.float32)).items())

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((text_folder / "text_encoder" / "config.json").read_text())
    tensors = {f"text_model.{k}": v for k, v in load_file(text_folder / "text_encoder" / "model.safetensors").items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(CLIP_MAX_LENGTH, dtype=np.int64)[None]
    save_file(tensors, legacy / "model.safetensors")
    assert all(np.array_equal(v, clip[k]) for k, v in _params(load_clip(legacy, dtype=jnp.float32)).items())

    tied = tmp_path / "tied"
    tied.mkdir()
    (tied / "config.json").write_text((text_folder / "text_encoder_2" / "config.json").read_text())
    tensors = load_file(text_folder / "text_encoder_2" / "model.safetensors")
    tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
    save_file(tensors, tied / "model.safetensors")
    assert all(np.array_equal(v, t5[k]) for k, v in _params(load_t5(tied, dtype=jnp.float32)).items())
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"]
    save_file(tensors, tied / "model.safetensors")
    assert all(np.array_equal(v, t5[k]) for k, v in _params(load_t5(tied, dtype=jnp.float32)).items())


def test_wo_stays_float32_in_float16_only(text_folder):
    """As transformers' `_keep_in_fp32_modules` (float16 only: bfloat16 has float32's range)."""
    ff = load_t5(text_folder / "text_encoder_2").encoder.block[0].layer[1].DenseReluDense
    assert ff.wi_0.kernel.dtype == ff.wo.kernel.dtype == jnp.bfloat16
    ff = load_t5(text_folder / "text_encoder_2", dtype=jnp.float16).encoder.block[0].layer[1].DenseReluDense
    assert ff.wi_0.kernel.dtype == jnp.float16 and ff.wo.kernel.dtype == jnp.float32
    ref = HFT5EncoderModel.from_pretrained(text_folder / "text_encoder_2", dtype=torch.bfloat16)
    assert ref.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
    assert load_clip(text_folder / "text_encoder").final_layer_norm.scale.dtype == jnp.bfloat16


# The prompt encoders ---------------------------------------------------------------------------

def test_jax_prompt_encoder_matches_torch(text_folder, tmp_path):
    jax_enc = JaxTextEncoders.from_pretrained(text_folder, max_sequence_length=24, dtype=jnp.float32)
    torch_enc = TextEncoders.from_pretrained(text_folder, max_sequence_length=24, dtype=torch.float32)
    with pytest.warns(UserWarning, match="prompt truncated to 77 tokens") as caught:
        ours = jax_enc.encode(PROMPTS)
    assert sum("truncated to 24 tokens" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch_enc.encode(PROMPTS)
    assert ours.prompt_embeds.shape == ref.prompt_embeds.shape == (3, 24, 32)
    assert ours.pooled_prompt_embeds.shape == ref.pooled_prompt_embeds.shape == (3, 32)
    assert ours.prompt_embeds.dtype == ours.pooled_prompt_embeds.dtype == np.float32
    t5_bound = t5_tolerance(jax_enc.text_encoder_2.config, 24)
    clip_bound = clip_tolerance(jax_enc.text_encoder.config, CLIP_MAX_LENGTH)
    assert flux_fixtures.relative_error(ours.prompt_embeds, ref.prompt_embeds) <= t5_bound
    assert flux_fixtures.relative_error(ours.pooled_prompt_embeds, ref.pooled_prompt_embeds) <= clip_bound


def test_jax_embedding_cache(text_folder, tmp_path, monkeypatch):
    enc = JaxTextEncoders.from_pretrained(text_folder, max_sequence_length=24, dtype=jnp.float32, cache_dir=tmp_path)
    first = enc.encode(PROMPTS[:2])
    assert len(list(tmp_path.glob("*.npz"))) == 2 and enc.cache_key.endswith(":jax:float32")
    monkeypatch.setattr(enc, "_run", lambda *a: pytest.fail("cache miss"))
    again = enc.encode(PROMPTS[1::-1])
    np.testing.assert_array_equal(again.prompt_embeds, first.prompt_embeds[::-1])
    np.testing.assert_array_equal(again.pooled_prompt_embeds, first.pooled_prompt_embeds[::-1])


def test_empty_prompt_list(text_folder):
    enc = JaxTextEncoders.from_pretrained(text_folder, max_sequence_length=24, dtype=jnp.float32)
    with pytest.raises(ValueError, match="empty"):
        enc.encode([])
