"""FLUX.1's quantization policy presets: which diffusers-named layers of the transformer, and which
transformers-named layers of the T5 text encoder, get W4A4, W4A16 or bf16 (docs/design.md, "Layer
policy"). The policy engine itself is model-agnostic (`convrot_jax.QuantPolicy`)."""

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


def t5_default_policy() -> QuantPolicy:
    """T5 (`text_encoder_2`): every linear of every block (attention q, k, v, o; the FFN's wi_0, wi_1,
    wo) weight-only int4 (W4A16); the token embedding, the relative position bias and the norms
    bf16. Not W4A4: the encoder runs once per prompt, so its GEMMs' speed matters little next to the
    weights' memory, which W4A16 shrinks as much; and quantizing the activations too adds error
    (tests/test_text_encoders.py measures both: relative L2 of the embeddings 1.3x W4A16's),
    on a model whose activations are known for outliers (why transformers keeps `wo` in float32
    in float16)."""
    return QuantPolicy(
        rules=((r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.(q|k|v|o)", "w4a16"),
               (r"encoder\.block\.\d+\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)", "w4a16")),
        default="bf16",
    )
