"""Lowers the sequence-parallel W4A4 denoising loop for CUDA on this (CPU) machine: Pallas Mosaic
GPU kernels, cuDNN attention and the all-to-alls inside one shard_map, on N forced CPU devices.
Catches lowering errors without a GPU (nothing runs); the kernels' and cuDNN's device checks are
patched to say "Hopper".

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu PYTHONPATH=. \
        python tools/check_sequence_parallel_lowering.py 4 63 250   # devices, text, image tokens
"""

import sys

import jax
import jax._src.cudnn.fused_attention_stablehlo as cudnn_attention
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import convrot_jax.ops
import pallas_kernels.rotate_quantize
import pallas_kernels.w4a4_matmul
from flux_flax import sampling, sequence_parallel
from flux_flax.config import FluxConfig
from flux_flax.fusion import fuse_projections
from flux_flax.quantize import quantize_model
from flux_flax.transformer import FluxTransformer2DModel

convrot_jax.ops.pallas_supported = lambda: True
convrot_jax.ops._gpu_compute_capability = lambda: "9.0"
for _module in (pallas_kernels.w4a4_matmul, pallas_kernels.rotate_quantize):
    _module.sm_count = lambda interpret: 132
cudnn_attention.check_cudnn_version = lambda: 91000
cudnn_attention.check_compute_capability = lambda capability: True


def main(devices: int, text: int, image: int) -> None:
    config = FluxConfig.small(num_attention_heads=4, attention_head_dim=64, axes_dims_rope=(16, 24, 24))
    model = nnx.eval_shape(lambda: fuse_projections(quantize_model(
        FluxTransformer2DModel(config, dtype=jnp.bfloat16, attention_impl="cudnn", rngs=nnx.Rngs(0)),
        implementation="pallas")))
    graphdef, state = nnx.split(model)
    mesh = Mesh(np.array(jax.devices()[:devices]).reshape(1, devices), (sequence_parallel.DATA, sequence_parallel.SEQUENCE))

    def loop(state, latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas, guidance, on_step):
        return sampling.denoise(nnx.merge(graphdef, state), latents, prompt_embeds, pooled, img_ids, txt_ids, sigmas,
                                guidance, on_step=on_step)

    shape = jax.ShapeDtypeStruct
    args = (shape((1, image, config.in_channels), jnp.float32), shape((1, text, config.joint_attention_dim), jnp.bfloat16),
            shape((1, config.pooled_projection_dim), jnp.bfloat16), shape((image, 3), jnp.float32),
            shape((text, 3), jnp.float32), shape((3,), jnp.float32), shape((1,), jnp.float32))
    sharded = jax.jit(lambda state, *args: sequence_parallel.denoise(loop, mesh, state, *args))
    hlo = sharded.trace(state, *args).lower(lowering_platforms=("cuda",)).as_text()
    print(f"lowered for CUDA on {devices} devices, {text} text + {image} image tokens: "
          f"{hlo.count('all_to_all')} all-to-alls, {hlo.count('mosaic_gpu')} Mosaic GPU mentions")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]))
