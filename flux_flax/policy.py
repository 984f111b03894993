"""FLUX.1's quantization policy preset: which diffusers-named layers get W4A4, W4A16 or bf16
(docs/design.md, "Layer policy"). The policy engine itself is model-agnostic (`convrot_jax.QuantPolicy`)."""

from __future__ import annotations

from convrot_jax import QuantPolicy


def flux_default_policy() -> QuantPolicy:
    """Token linears W4A4, AdaLN modulation W4A16, embedders and the final projection bf16. The
    fused projections (flux_flax.fusion: to_qkv, to_added_qkv, to_qkv_mlp) are W4A4 like the
    layers they join, for a model fused before quantizing."""
    return QuantPolicy(
        rules=(
            (r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out"
             r"|to_qkv|to_added_qkv)", "w4a4"),
            (r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)", "w4a4"),
            (r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_qkv)|proj_mlp|proj_out|to_qkv_mlp)", "w4a4"),
            (r"(transformer_blocks|single_transformer_blocks)\.\d+\.(norm1|norm1_context|norm)\.linear", "w4a16"),
            (r"norm_out\.linear", "w4a16"),
        ),
        default="bf16",
    )
