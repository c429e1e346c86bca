"""Export a jaxeff decoder as a Hugging Face Llama checkpoint (safetensors), and read it back.

`save_llama` writes ``config.json`` (``LlamaForCausalLM``) and ``model.safetensors`` (float32,
torch's ``[d_out, d_in]`` layout) and, when given, the tokenizer (``tokenizer.json`` and a
``tokenizer_config.json`` carrying the ChatML template), so that::

    AutoModelForCausalLM.from_pretrained(directory)

gives the same logits as the jaxeff model; a model carrying LoRA adapters is merged first
(`jaxeff.nn.lora.merge_lora`). `load_llama` reads such a directory (ours or a Llama checkpoint
in one safetensors file) back into a `Transformer`.

Layout: jaxeff's kernels are ``[d_in, d_out]`` stacked on a leading layer axis; HF's
``nn.Linear.weight`` is ``[d_out, d_in]``, one tensor per layer. Both rotate the halves
``(x_i, x_{i + head_dim/2})`` in RoPE, so the query and key rows need no permutation (unlike
GGUF's, see `jaxeff.llm.gguf`).
"""

from __future__ import annotations

import json
import os

import numpy as np
from flax import nnx

from jaxeff.nn.transformer import Transformer, TransformerConfig

_BLOCK = {
    # jaxeff path under blocks -> HF name under model.layers.{i}
    "attn_norm.scale": "input_layernorm.weight",
    "attn.q.kernel": "self_attn.q_proj.weight",
    "attn.k.kernel": "self_attn.k_proj.weight",
    "attn.v.kernel": "self_attn.v_proj.weight",
    "attn.o.kernel": "self_attn.o_proj.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
    "mlp.gate.kernel": "mlp.gate_proj.weight",
    "mlp.up.kernel": "mlp.up_proj.weight",
    "mlp.down.kernel": "mlp.down_proj.weight",
}
_WEIGHTS = "model.safetensors"
_REQUIRED_INTS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_OPTIONAL_INTS = ("num_key_value_heads", "max_position_embeddings", "head_dim")


def hf_config(cfg: TransformerConfig, **ids) -> dict:
    """The ``config.json`` of a ``LlamaForCausalLM`` with ``cfg``'s shape."""
    if cfg.rope_scaling is not None:
        raise ValueError("export: rope_scaling is not supported (export a model without it)")
    if getattr(cfg, "moe", None) is not None:
        raise ValueError("export: mixture-of-experts models are not Llama models")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    config.update({k: v for k, v in ids.items() if v is not None})
    return config


def _flat_params(model: Transformer) -> dict[str, np.ndarray]:
    """float32 arrays keyed by the dotted parameter paths (``blocks.attn.q.kernel`` ...)."""
    out = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path if str(p) != "value")
        out[name] = np.asarray(value[...], np.float32)
    return out


def to_hf_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """The model's weights under HF Llama names and layout."""
    from jaxeff.nn import lora

    if any(isinstance(m, lora.LoRALinear) for _, m in nnx.iter_modules(model)):
        model = lora.merge_lora(model)
    cfg = model.cfg
    flat = _flat_params(model)
    out = {"model.embed_tokens.weight": flat["embed.embedding"]}
    for ours, theirs in _BLOCK.items():
        stacked = flat[f"blocks.{ours}"]
        for i in range(cfg.n_layers):
            w = stacked[i]
            out[f"model.layers.{i}.{theirs}"] = np.ascontiguousarray(w.T if w.ndim == 2 else w)
    out["model.norm.weight"] = flat["final_norm.scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(flat["lm_head.kernel"].T)
    return out


def save_llama(model: Transformer, directory: str, tokenizer=None, chat=None) -> str:
    """Writes ``model`` (adapters merged) as an HF Llama checkpoint under ``directory``.

    Args:
      model: a `Transformer` (optionally with LoRA adapters).
      directory: created if missing; existing files of the same names are replaced.
      tokenizer: a ``tokenizers.Tokenizer`` to save as ``tokenizer.json`` (optional).
      chat: the `jaxeff.llm.chat.ChatTemplate` whose ids and ChatML template go into the
        configs (optional).

    Returns:
      the directory.
    """
    from safetensors.numpy import save_file

    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"export: {directory!r} exists and is not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        reason = err.strerror or err
        raise ValueError(f"export: cannot create directory {directory!r} ({reason})") from err
    ids = {}
    if chat is not None:
        ids = {
            "bos_token_id": chat.bos_id,
            "eos_token_id": chat.eos_id,
            "pad_token_id": chat.pad_id,
        }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(model.cfg, **ids), f, indent=1)
    save_file(to_hf_tensors(model), os.path.join(directory, _WEIGHTS), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(os.path.join(directory, "tokenizer.json"))
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
        }
        if chat is not None:
            tok_cfg["chat_template"] = _CHATML_JINJA
            for name, i in (("bos_token", chat.bos_id), ("eos_token", chat.eos_id)):
                if i is not None:
                    tok_cfg[name] = tokenizer.id_to_token(i)
            if chat.pad_id is not None:
                tok_cfg["pad_token"] = tokenizer.id_to_token(chat.pad_id)
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(tok_cfg, f, indent=1)
    return directory


_CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def config_from_hf(config: dict, dtype: str = "float32") -> TransformerConfig:
    """A `TransformerConfig` from a Llama ``config.json`` dict."""
    if not isinstance(config, dict):
        raise ValueError(f"config.json: expected a JSON object, got {type(config).__name__}")
    if config.get("model_type") != "llama":
        raise ValueError(f"config.json: model_type={config.get('model_type')!r}; allowed: 'llama'")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"config.json: {flag}=true is not supported (jaxeff has no biases)")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise ValueError("config.json: only rope_type 'default' (no rope scaling) is supported")
    for key in _REQUIRED_INTS + _OPTIONAL_INTS:
        value = config.get(key)
        if value is None and key in _OPTIONAL_INTS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            got = "missing" if key not in config else repr(value)
            raise ValueError(f"config.json: {key} must be a positive integer, got {got}")
    for key in ("rms_norm_eps", "rope_theta"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"config.json: {key} must be a number, got {value!r}")
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", dim // heads) != dim // heads:
        raise ValueError("config.json: head_dim must equal hidden_size / num_attention_heads")
    return TransformerConfig(
        vocab_size=config["vocab_size"],
        dim=dim,
        n_layers=config["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=config.get("num_key_value_heads", heads),
        ffn_dim=config["intermediate_size"],
        max_seq_len=config.get("max_position_embeddings", 2048),
        rope_base=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=config.get("rms_norm_eps", 1e-5),
        tie_embeddings=config.get("tie_word_embeddings", False),
        dtype=dtype,
    )


def load_llama(directory: str, dtype: str = "float32") -> Transformer:
    """A `Transformer` from an HF Llama directory (``config.json`` + ``model.safetensors``).

    Raises:
      ValueError: naming the file, when either is missing, ``config.json`` is not JSON or not
        a supported Llama config, or the safetensors file is unreadable, lacks a tensor or
        holds one whose shape disagrees with the config.
    """
    from safetensors import SafetensorError, safe_open

    from jaxeff.llm.gguf import _build_model

    paths = {n: os.path.join(directory, n) for n in ("config.json", _WEIGHTS)}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise ValueError(f"{directory!r} is not a Llama checkpoint: {name} is missing")
    try:
        with open(paths["config.json"], encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        line = (str(err).splitlines() or [""])[0]
        raise ValueError(f"{paths['config.json']} is not valid JSON ({line})") from err
    try:
        cfg = config_from_hf(config, dtype)
    except ValueError as err:
        reason = str(err).removeprefix("config.json: ")
        raise ValueError(f"{paths['config.json']}: {reason}") from err
    try:
        with safe_open(paths[_WEIGHTS], framework="numpy") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, TypeError) as err:  # TypeError: bfloat16 in numpy
        raise ValueError(f"{paths[_WEIGHTS]} is not a readable safetensors file ({err})") from err

    d, f, h, v = cfg.dim, cfg.ffn_dim, cfg.head_dim, cfg.vocab_size
    q, kv = cfg.n_heads * h, cfg.n_kv_heads * h
    block_shapes = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
    }

    def get(name, shape):
        if name not in tensors:
            raise ValueError(f"{paths[_WEIGHTS]} lacks tensor {name!r}")
        w = tensors[name]
        if tuple(w.shape) != shape:
            raise ValueError(
                f"{paths[_WEIGHTS]}: tensor {name!r} has shape {tuple(w.shape)}, "
                f"config.json implies {shape}"
            )
        return np.asarray(w, np.float32)

    arrays = {"embed.embedding": get("model.embed_tokens.weight", (v, d))}
    for ours, theirs in _BLOCK.items():
        shape = block_shapes[theirs]
        layers = [get(f"model.layers.{i}.{theirs}", shape) for i in range(cfg.n_layers)]
        arrays[f"blocks.{ours}"] = np.stack([w.T if w.ndim == 2 else w for w in layers])
    arrays["final_norm.scale"] = get("model.norm.weight", (d,))
    if not cfg.tie_embeddings:
        arrays["lm_head.kernel"] = np.ascontiguousarray(get("lm_head.weight", (v, d)).T)
    return _build_model(cfg, arrays)


__all__ = ["config_from_hf", "hf_config", "load_llama", "save_llama", "to_hf_tensors"]
