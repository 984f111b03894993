"""Shared test fixtures for FLUX: diffusers reference models with random weights, real safetensors
checkpoints in every layout the loaders read, inputs, and the comparison metric.

Import from a test module as `import flux_fixtures` (pytest puts tests/ on sys.path). All helpers
are plain functions; torch and diffusers are imported lazily (test-only dependencies).

    ref = flux_fixtures.diffusers_transformer(FluxConfig.tiny())        # torch, fp32, random
    path = flux_fixtures.save_diffusers(ref, tmp_path / "transformer")   # config.json + safetensors
    flux_fixtures.save_diffusers(ref, d, max_shard_size="50KB")          # sharded + index
    flux_fixtures.save_pipeline_root(ref, tmp_path / "FLUX")             # FLUX/transformer/...
    flux_fixtures.save_bfl(ref, tmp_path / "flux1.safetensors")          # black-forest-labs file
    flux_fixtures.save_lora(tmp_path / "l.safetensors", flux_fixtures.linear_shapes(ref), ["x_embedder"], rank=4, seed=0)
    inputs = flux_fixtures.flux_inputs(config)                           # dict of numpy arrays
    expected = flux_fixtures.run_diffusers(ref, inputs)                  # numpy
    assert flux_fixtures.relative_error(out, expected) <= flux_fixtures.model_tolerance(config, tokens)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from flux_flax.keymaps import BFL_PREFIX, diffusers_to_bfl
from flux_flax.config import FluxConfig
from flux_flax.loading import diffusers_key
from flux_flax.transformer import param_paths


def diffusers_transformer(config: FluxConfig, seed: int = 0):
    """diffusers' FluxTransformer2DModel for `config`, float32, eval mode, random weights: the
    default torch init, with the RMSNorm weights drawn around 1 (not all ones) so that their
    mapping is tested too."""
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**config.to_dict()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm_" in name:
                p.normal_(1.0, 0.1)
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    """A torch module's state dict as float32 numpy arrays."""
    return {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}


def save_diffusers(model, directory: Path, *, max_shard_size: str | None = None) -> Path:
    """diffusers' own `save_pretrained` (safetensors): config.json +
    diffusion_pytorch_model.safetensors, or shards + index when `max_shard_size` is small."""
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    return Path(directory)


def save_pipeline_root(model, root: Path) -> Path:
    """A diffusers pipeline root: model_index.json + transformer/ (other components omitted)."""
    root = Path(root)
    save_diffusers(model, root / "transformer")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}
    ))
    return root


def save_bfl(model, file: Path, *, prefix: bool = False) -> Path:
    """The same weights as a black-forest-labs single file (`flux1-dev.safetensors` layout), keys
    optionally under "model.diffusion_model." as in some ComfyUI exports."""
    from safetensors.numpy import save_file

    tensors = diffusers_to_bfl(state_dict_numpy(model))
    if prefix:
        tensors = {BFL_PREFIX + k: v for k, v in tensors.items()}
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file))
    return Path(file)


def copy_torch_weights(nnx_module, torch_module) -> None:
    """Copies a torch module's weights into the NNX module mirroring it (same relative names;
    kernels transposed), cast to each parameter's dtype. For per-module tests."""
    import jax.numpy as jnp

    sd = state_dict_numpy(torch_module)
    for path, var in param_paths(nnx_module):
        key, transpose = diffusers_key(path)
        value = sd.pop(key)
        var.set_value(jnp.asarray(value.T if transpose else value, var.dtype))
    assert not sd, f"torch weights with no NNX counterpart: {sorted(sd)}"


def image_ids(height: int, width: int) -> np.ndarray:
    """RoPE ids of a packed latent grid, as diffusers' pipeline makes them: (h*w, 3) = [0, row, col]."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def flux_inputs(config: FluxConfig, *, batch: int = 2, height: int = 3, width: int = 5, text_len: int = 7,
                seed: int = 0) -> dict[str, np.ndarray]:
    """The transformer's keyword inputs as float32 numpy arrays: a non-square height x width
    latent grid (already packed: in_channels per token), `text_len` text tokens, timesteps in
    (0, 1), and a per-sample guidance scale when the config has a guidance embedding."""
    rng = np.random.default_rng(seed)
    inputs = {
        "hidden_states": rng.standard_normal((batch, height * width, config.in_channels), np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, text_len, config.joint_attention_dim), np.float32),
        "pooled_projections": rng.standard_normal((batch, config.pooled_projection_dim), np.float32),
        "timestep": rng.uniform(0.05, 0.95, (batch,)).astype(np.float32),
        "img_ids": image_ids(height, width),
        "txt_ids": np.zeros((text_len, 3), np.float32),
    }
    if config.guidance_embeds:
        inputs["guidance"] = rng.uniform(1.0, 5.0, (batch,)).astype(np.float32)
    return inputs


def run_diffusers(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """diffusers' forward on numpy inputs -> numpy output (float32)."""
    import torch

    with torch.no_grad():
        out = model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, return_dict=False)[0]
    return out.float().numpy()


def relative_error(out, ref) -> float:
    """max|out - ref| / max|ref|: the comparison metric of every float32 numerics test."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


F32_EPS = float(np.finfo(np.float32).eps)
# diffusers' timestep sinusoid reaches t * 1 rad with t up to 1000 (x 1000 for guidance 3.5 too);
# two float32 evaluations of such an angle may differ by one ulp of it (exp/mul in another order),
# which moves sin/cos by up to that ulp.
MAX_TIMESTEP_ANGLE = 3.5 * 1000


def joint_attention_error(attn, impl: str, image_tokens: int, text_tokens: int) -> float:
    """Relative L2 error of a FluxAttention `attn` (width 256, with text projections) run with the
    attention implementation `impl` against its exact "xla" run, on random bf16 image and text
    tokens with RoPE over random image positions (key 4)."""
    import jax
    import jax.numpy as jnp

    from flux_flax.layers import FluxPosEmbed

    ks = jax.random.split(jax.random.key(4), 3)
    img = jax.random.normal(ks[0], (1, image_tokens, 256), jnp.bfloat16)
    txt = jax.random.normal(ks[1], (1, text_tokens, 256), jnp.bfloat16)
    ids = jnp.concatenate([jnp.zeros((text_tokens, 3)),
                           jax.random.randint(ks[2], (image_tokens, 3), 0, 8).astype(jnp.float32)])
    rope = FluxPosEmbed(10000, (32, 48, 48))(ids)

    def run(name: str) -> np.ndarray:
        attn.attention_impl = name
        return np.concatenate([np.asarray(o, np.float64).ravel() for o in attn(img, txt, rope)])

    exact, ours = run("xla"), run(impl)
    return float(np.linalg.norm(ours - exact) / np.linalg.norm(exact))


def float32_tolerance(*reductions: int, angle: float = 0.0) -> float:
    """A bound on `relative_error` between two float32 evaluations of one function that differ only
    in summation order and in the last bit of elementwise functions.

    A dot product of length n carries a relative error of at most n * eps (Higham's gamma_n, to
    first order), and the errors of chained products add: eps * sum(reductions). An input angle
    evaluated to one ulp adds that ulp (sin and cos have slope <= 1 and values <= 1). It is a
    worst case, loose by about sqrt(n), and still far below the O(1) error of a wrong weight,
    mapping, sign or scale.
    """
    return F32_EPS * sum(reductions) + (float(np.spacing(np.float32(angle))) if angle else 0.0)


def block_reductions(dim: int, head_dim: int, tokens: int, *, single: bool) -> tuple[int, ...]:
    """The reduction lengths along one FLUX block: modulation, projections, QK^T, softmax sum,
    PV, LayerNorm statistics and the MLP (width 4 * dim)."""
    attention = (head_dim, tokens, tokens)
    if single:
        return (dim, 2 * dim, dim, *attention, 5 * dim)  # mod, LN mean/var, qkv+mlp, ..., proj_out
    return (dim, 2 * dim, dim, *attention, dim, 2 * dim, dim, 4 * dim)  # mod, LN, qkv, ..., out, LN, mlp


def model_tolerance(config: FluxConfig, tokens: int) -> float:
    """`float32_tolerance` of a whole FLUX transformer forward over `tokens` joint tokens:
    embedders, every block, the output norm and projection, and the timestep angle."""
    dim = config.num_attention_heads * config.attention_head_dim
    head = config.attention_head_dim
    reductions = [config.in_channels, config.joint_attention_dim, 256, dim, config.pooled_projection_dim, dim]
    for _ in range(config.num_layers):
        reductions += block_reductions(dim, head, tokens, single=False)
    for _ in range(config.num_single_layers):
        reductions += block_reductions(dim, head, tokens, single=True)
    reductions += [dim, 2 * dim, dim]  # norm_out: modulation, LN statistics, proj_out
    return float32_tolerance(*reductions, angle=MAX_TIMESTEP_ANGLE)


def int4_weight_errors(model, policy, *, group_size: int = 256) -> list[float]:
    """||dequantize(quantize(W)) - W|| / ||W|| of every linear of a float model that `policy`
    quantizes (the rotation is orthogonal: the same in the rotated basis)."""
    import jax.numpy as jnp

    from convrot_jax import dequantize_weight, quantize_weight
    from flux_flax.transformer import linear_paths

    errors = []
    for path, layer in linear_paths(model):
        if policy.treatment(path) != "bf16":
            w = jnp.asarray(layer.kernel[...], jnp.float32).T
            error = dequantize_weight(quantize_weight(w, group_size=group_size)) - w
            errors.append(float(jnp.linalg.norm(error) / jnp.linalg.norm(w)))
    return errors
def lora_factors(rng, rank: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A (r, K) and B (N, r) whose term is of the order of the layer's own output."""
    return ((rng.standard_normal((rank, k)) / np.sqrt(k)).astype(np.float32),
            (rng.standard_normal((n, rank)) / np.sqrt(rank)).astype(np.float32))


def linear_shapes(torch_model) -> dict[str, tuple[int, int]]:
    """{diffusers linear name: (in, out)} of a torch model."""
    import torch

    return {name: (m.in_features, m.out_features) for name, m in torch_model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def save_lora(path, shapes, modules, rank: int, seed: int, alphas: dict[str, float] | None = None) -> int:
    """A PEFT-named LoRA file ("transformer.<layer>.lora_A.weight", ...) with random factors
    (`lora_factors`) on `modules` (diffusers linear names; `shapes`: their (in, out)). `alphas`:
    every module gets one, `alphas[name]` or else `alphas["*"]` (diffusers gives a module without
    one the file's most common alpha, kohya and this port 1, so a file has all or none).
    Returns the sum over modules of K + r (the reductions the LoRA adds)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors, reductions = {}, 0
    for name in modules:
        k, n = shapes[name]
        a, b = lora_factors(rng, rank, k, n)
        tensors[f"transformer.{name}.lora_A.weight"], tensors[f"transformer.{name}.lora_B.weight"] = a, b
        if alphas is not None:
            tensors[f"transformer.{name}.alpha"] = np.array(alphas.get(name, alphas["*"]), np.float32)
        reductions += k + rank
    save_file(tensors, str(path))
    return reductions


def run_with_devices(args: list[str], devices: int = 4, **popen) -> subprocess.Popen:
    """`python args...` from the repository root in a process of its own whose CPU backend has
    `devices` devices (XLA's forced host device count), so the suite's other tests keep one."""
    root = Path(__file__).resolve().parents[1]
    flags = " ".join([os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"])
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "PYTHONPATH": str(root), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=root, **popen)


def run_with_4_devices(args: list[str]) -> subprocess.CompletedProcess:
    """`run_with_devices` with 4 devices, waited for (5 minutes at most)."""
    process = run_with_devices(args)
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
