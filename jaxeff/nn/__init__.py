"""Neural network modules (flax.nnx): the Llama-style `Transformer` with MoE and MoD layers,
RoPE and its context extensions, LoRA, CLIP, CTR models, seq2seq and video encoders.

Everything loads on first use: ``import jaxeff.nn`` and ``jaxeff.nn.config`` (the jax-free
`TransformerConfig`, `MoEConfig`, `ModConfig`, `RopeScaling` and the configs of the video-LLM,
the video denoiser and the encoder-decoder) do not import jax; reading
``jaxeff.nn.Transformer`` imports `jaxeff.nn.transformer`.
"""

from jaxeff._lazy import attach as _attach

_EXPORTS = {
    "config": (
        "ModConfig",
        "MoEConfig",
        "RopeScaling",
        "Seq2SeqConfig",
        "TransformerConfig",
        "VideoDenoiserConfig",
        "VideoLLMConfig",
    ),
    "transformer": ("KVCache", "Transformer"),
}

__getattr__, __dir__, __all__ = _attach(
    __name__,
    submodules=(
        "attention",
        "clip",
        "config",
        "ctr",
        "lora",
        "mod",
        "moe",
        "rope",
        "seq2seq",
        "transformer",
        "video",
        "videollm",
    ),
    attrs={name: module for module, names in _EXPORTS.items() for name in names},
)
