"""Configurations of jaxeff's models, free of jax.

`TransformerConfig` (a Llama-style decoder), `MoEConfig` (OpenMoE FFN layers), `ModConfig`
(Mixture-of-Depths / MoDification routed layers), `RopeScaling` (PI, NTK, YaRN, Llama 3
context extension), `VideoLLMConfig` (VideoLLM-MoD's clips and decoder),
`VideoDenoiserConfig` (the DSP spatial-temporal denoiser) and `Seq2SeqConfig` (kNN-MT's
encoder-decoder) are frozen dataclasses of plain Python values: experiments embed them in
their own configs (``--set model.n_layers=6``), and ``import jaxeff.nn.config`` does not
import jax, so a launcher can read and validate a run's configuration before any device
starts. Anything that needs jax (``compute_dtype``) imports it inside.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

ROPE_METHODS = ("none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How to stretch RoPE beyond the pretraining context ``original_max_len``.

    Args:
      method: one of ``ROPE_METHODS`` (see the module docstring).
      factor: the extension ratio ``s >= 1`` (target length / ``original_max_len``).
      original_max_len: ``L0``, the context length the model was pretrained on (used by
        ``dynamic_ntk``, ``yarn`` and ``llama3``).
      beta_fast, beta_slow: YaRN's ramp bounds in rotations over ``L0``: dimensions that turn
        more than ``beta_fast`` times are kept, fewer than ``beta_slow`` times interpolated.
      low_freq_factor, high_freq_factor: Llama 3.1's wavelength bounds: wavelengths above
        ``L0 / low_freq_factor`` are divided by ``s``, below ``L0 / high_freq_factor`` kept.
    """

    method: str = "none"
    factor: float = 1.0
    original_max_len: int = 2048
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        if self.method not in ROPE_METHODS:
            raise ValueError(
                f"RopeScaling.method={self.method!r}; allowed: {', '.join(ROPE_METHODS)}"
            )
        if not (_is_real(self.factor) and math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"RopeScaling.factor={self.factor!r}; allowed: a finite number >= 1")
        if not (
            isinstance(self.original_max_len, numbers.Integral)
            and not isinstance(self.original_max_len, bool)
            and self.original_max_len >= 1
        ):
            raise ValueError(
                f"RopeScaling.original_max_len={self.original_max_len!r}; allowed: an int >= 1"
            )
        if self.method == "yarn" and not (
            _is_real(self.beta_slow)
            and _is_real(self.beta_fast)
            and 0 < self.beta_slow < self.beta_fast
        ):
            raise ValueError(
                f"RopeScaling.beta_fast={self.beta_fast!r}, beta_slow={self.beta_slow!r}; "
                "allowed: 0 < beta_slow < beta_fast (YaRN)"
            )
        if self.method == "llama3" and not (
            _is_real(self.low_freq_factor)
            and _is_real(self.high_freq_factor)
            and 0 < self.low_freq_factor < self.high_freq_factor
        ):
            raise ValueError(
                f"RopeScaling.low_freq_factor={self.low_freq_factor!r}, "
                f"high_freq_factor={self.high_freq_factor!r}; "
                "allowed: 0 < low_freq_factor < high_freq_factor (llama3)"
            )


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


CONVENTIONS = ("flaxformer", "maxtext")
IMPLEMENTATIONS = ("einsum", "ragged_dot", "gmm")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A Mixture-of-Experts FFN and where it goes in the decoder.

    Attributes:
      num_experts: ``E``.
      top_k: experts per token (OpenMoE: 2).
      expert_dim: hidden width of each SwiGLU expert.
      every: one MoE layer every ``every`` decoder layers (the last of each run of ``every``);
        ``n_layers`` must divide by it. OpenMoE uses 4 or 6.
      residual: residual MoE, ``x + MoE(x) + FFN(x)`` (OpenMoE); False: ``x + MoE(x)``.
      capacity_factor / eval_capacity_factor: ``cf`` in training / evaluation.
      min_capacity: lower bound on ``C``.
      capacity_convention: "flaxformer" (``cf S / E``) or "maxtext" (``cf S k / E``).
      implementation: "einsum", "ragged_dot" or "gmm" (see the module docstring).
      load_balance_weight / z_loss_weight: weights of the auxiliary losses.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_dim: int = 256
    every: int = 4
    residual: bool = True
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    capacity_convention: str = "flaxformer"
    implementation: str = "einsum"
    load_balance_weight: float = 0.01
    z_loss_weight: float = 1e-4

    def __post_init__(self):
        checks = {
            "num_experts": (self.num_experts >= 1, ">= 1"),
            "top_k": (1 <= self.top_k <= self.num_experts, "in 1..num_experts"),
            "expert_dim": (self.expert_dim >= 1, ">= 1"),
            "every": (self.every >= 1, ">= 1"),
            "capacity_factor": (self.capacity_factor > 0, "> 0"),
            "eval_capacity_factor": (self.eval_capacity_factor > 0, "> 0"),
            "min_capacity": (self.min_capacity >= 0, ">= 0"),
            "load_balance_weight": (self.load_balance_weight >= 0, ">= 0"),
            "z_loss_weight": (self.z_loss_weight >= 0, ">= 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r}; allowed: {allowed}")
        if self.capacity_convention not in CONVENTIONS:
            raise ValueError(
                f"MoEConfig.capacity_convention={self.capacity_convention!r}; "
                f"allowed: {', '.join(CONVENTIONS)}"
            )
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"MoEConfig.implementation={self.implementation!r}; "
                f"allowed: {', '.join(IMPLEMENTATIONS)}"
            )

    def capacity(self, tokens_per_group: int, train: bool) -> int:
        cf = self.capacity_factor if train else self.eval_capacity_factor
        return expert_capacity(
            tokens_per_group,
            self.num_experts,
            cf,
            top_k=self.top_k,
            convention=self.capacity_convention,
            min_capacity=self.min_capacity,
        )


def expert_capacity(
    tokens_per_group: int,
    num_experts: int,
    capacity_factor: float,
    *,
    top_k: int = 1,
    convention: str = "flaxformer",
    min_capacity: int = 4,
) -> int:
    """Slots per expert and group: ``ceil(cf * S / E)`` (Flaxformer) or ``ceil(cf * S * k / E)``
    (MaxText), at least ``min_capacity``."""
    if convention not in CONVENTIONS:
        raise ValueError(f"capacity convention {convention!r}; allowed: {', '.join(CONVENTIONS)}")
    slots = capacity_factor * tokens_per_group / num_experts
    if convention == "maxtext":
        slots *= top_k
    return max(int(math.ceil(slots - 1e-9)), min_capacity)


ROUTERS = ("topk", "threshold", "frame_topr")
MOD_IMPLEMENTATIONS = (None, "xla", "pallas")  # jaxeff.kernels.mod_routing.api
WEIGHTINGS = ("raw", "sigmoid", "none", "straight_through")


@dataclasses.dataclass(frozen=True)
class ModConfig:
    """Routed (Mixture-of-Depths) layers in the shared decoder (`TransformerConfig.mod`).

    Attributes:
      router: ``"topk"`` (MoD expert-choice top-k over the sequence, ``capacity``),
        ``"threshold"`` (MoDification: a token runs the layer iff ``sigmoid(r_i) > p``) or
        ``"frame_topr"`` (VideoLLM-MoD: per frame the top ``r`` of its vision tokens, text always;
        needs frame ids, so not in the text decoder).
      capacity: top-k capacity ``c`` in (0, 1] (``k = max(1, floor(c S))``).
      p: threshold in [0, 1).
      r: per-frame vision ratio in (0, 1] of ``"frame_topr"``; ``num_frames`` its frame count.
      every: one routed layer every ``every`` layers (the last of each run; ``n_layers`` must
        divide by it). MoD's best: 2 (every other block).
      weighting: output scale ``w_i`` (`jaxeff.nn.mod.router_weights`); None: ``"raw"`` for
        top-k (MoD's ``r_i``), ``"none"`` otherwise (a converted model keeps its block outputs);
        ``"straight_through"``: 1 exactly with the gradient of ``log sigmoid(r_i)``.
      router_bce_weight: weight of the top-k auxiliary BCE (router logit vs top-k membership),
        which makes ``r_i > 0`` a causal decision for decoding.
      predictor_hidden: > 0 adds MoD's small MLP predictor on ``stop_gradient(x)``, trained by
        BCE against the top-k decision (aux ``mod_predictor_bce``, weight 1: it cannot move the
        model); causal decoding then routes by ``predictor > 0``.
      cache_fraction: causal routing (threshold, or top-k decoded with the predictor) computes
        at most ``ceil(cache_fraction * S)`` tokens per row and routed layer (the earliest routed
        ones; later routed tokens are skipped): the routed layers' KV caches hold that many
        slots, so a full forward of ``S`` tokens and decoding into a cache of ``S`` slots agree.
      keep_first: the first ``keep_first`` positions are always computed under causal routing
        (attention sinks; a decision by position, still causal).
      implementation: how routed tokens are gathered and scattered back
        (`jaxeff.kernels.mod_routing`): None or ``"xla"`` (XLA gather / scatter-add, the
        default on every backend until a device measures the kernels faster) or ``"pallas"``
        (the indexed-copy kernels: Mosaic on TPU, Triton on GPU, interpreted on CPU).
    """

    router: str = "topk"
    capacity: float = 0.125
    p: float = 0.5
    r: float = 0.2
    num_frames: int = 1
    every: int = 2
    weighting: str | None = None
    router_bce_weight: float = 0.01
    predictor_hidden: int = 0
    cache_fraction: float = 1.0
    keep_first: int = 0
    implementation: str | None = None

    def __post_init__(self):
        checks = {
            "implementation": (
                self.implementation in MOD_IMPLEMENTATIONS,
                f"one of {MOD_IMPLEMENTATIONS}",
            ),
            "router": (self.router in ROUTERS, ", ".join(repr(r) for r in ROUTERS)),
            "capacity": (0.0 < self.capacity <= 1.0, "in (0, 1]"),
            "p": (0.0 <= self.p < 1.0, "in [0, 1)"),
            "r": (0.0 < self.r <= 1.0, "in (0, 1]"),
            "num_frames": (self.num_frames >= 1, ">= 1"),
            "every": (self.every >= 1, ">= 1"),
            "weighting": (self.weighting in (None, *WEIGHTINGS), f"None or one of {WEIGHTINGS}"),
            "router_bce_weight": (self.router_bce_weight >= 0, ">= 0"),
            "predictor_hidden": (self.predictor_hidden >= 0, ">= 0"),
            "cache_fraction": (0.0 < self.cache_fraction <= 1.0, "in (0, 1]"),
            "keep_first": (self.keep_first >= 0, ">= 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"ModConfig.{name}={getattr(self, name)!r}; allowed: {allowed}")

    @property
    def output_weighting(self) -> str:
        return self.weighting or ("raw" if self.router == "topk" else "none")

    def max_tokens(self, length: int) -> int:
        """Routed-layer slots for a sequence (or cache) of ``length``: ``ceil(f * length)``."""
        return max(1, min(length, int(math.ceil(self.cache_fraction * length - 1e-9))))


DTYPES = ("float32", "bfloat16", "float16")
# TransformerConfig.remat: what the backward pass keeps of each layer group (see its docstring)
REMAT_POLICIES = (
    "none",
    "full",
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "offload_dots",
)
# implementations of jaxeff.nn.attention.dot_product_attention
ATTENTION_IMPLEMENTATIONS = ("xla", "xla_chunked", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and options of a Llama-style decoder.

    Precision and memory (the fields a large run sets from the CLI, ``--set model.dtype=...``):

    - ``dtype``: the compute dtype of activations and matmuls (one of ``DTYPES``). Whatever it
      is, RMSNorm, RoPE and the attention softmax run in float32 and the logits are float32
      (the head's matmul accumulates in float32, ``preferred_element_type``), so the
      cross-entropy ``log sum_v exp(z_v) - z_y`` is never taken in bfloat16.
    - ``param_dtype``: the dtype every parameter is created and stored in (one of ``DTYPES``;
      embeddings, linears, norms, MoE experts and router, MoD router and predictor); each is
      cast to the compute dtype where it is used. ``dtype="bfloat16"`` with float32 parameters
      is the usual mixed precision (the optimizer updates float32 weights); both bfloat16
      halves parameter and optimizer memory (optax states follow the parameters' dtype), at
      the cost of updates below a weight's bfloat16 resolution being lost.
    - ``remat``: what the backward pass keeps of each layer group (the body of the layer scan,
      `jax.checkpoint` with a policy); the rest is recomputed from the group's input:

      ``False`` / ``"none"``: everything (no recomputation, most memory);
      ``True`` / ``"full"`` / ``"nothing_saveable"``: only the group inputs (recompute the
      whole forward of the layer, about a third more FLOPs);
      ``"dots_saveable"``: every matmul output (recompute the elementwise work only);
      ``"dots_with_no_batch_dims_saveable"``: the outputs of the 2-D projections (q, k, v, o
      and the SwiGLU matmuls, which `jaxeff.nn.transformer.Linear` runs as 2-D dots), not
      the batched attention score / value products (whose size grows as ``S^2``) nor the
      batched per-expert einsums of MoE layers;
      ``"offload_dots"``: as the previous, but the saved outputs go to pinned host memory
      (``jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")``)
      and come back for the backward pass: device memory near ``"full"`` at the compute of
      ``"dots_with_no_batch_dims_saveable"``, paid in host transfers. It lowers for CUDA
      (``tests/nn/test_precision.py`` exports it from a CPU host; not yet measured on a
      device); on CPU host and device memory are one, so it runs and saves like the previous.

      Booleans stay accepted (older configs and run JSON); `remat_policy` gives the
      canonical name.
    """

    vocab_size: int = 4096
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 8
    ffn_dim: int = 1408
    max_seq_len: int = 2048
    rope_base: float = 10000.0
    rope_scaling: RopeScaling | None = None  # PI / NTK / YaRN context extension
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype of activations (see the class docstring)
    param_dtype: str = "float32"  # dtype parameters are created and stored in
    # what the backward keeps per layer group: False/True or a name of REMAT_POLICIES
    remat: bool | str = False
    scan_layers: bool = True  # lax.scan over the stacked layers (False: unrolled loop)
    init_std: float = 0.02
    moe: MoEConfig | None = None  # Mixture-of-Experts FFN every moe.every layers
    mod: ModConfig | None = None  # Mixture-of-Depths routed layer every mod.every layers
    # attention implementation (jaxeff.nn.attention.dot_product_attention); None: per backend
    attention: str | None = None

    @classmethod
    def smollm2_135m(cls, **overrides) -> TransformerConfig:
        """SmolLM2-135M (Allal et al., 2025): 30 layers, width 576, 9 query / 3 KV heads,
        SwiGLU 1536, vocabulary 49152, RoPE base 1e5, context 8192, tied embeddings."""
        base = dict(
            vocab_size=49152,
            dim=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            ffn_dim=1536,
            max_seq_len=8192,
            rope_base=100000.0,
            norm_eps=1e-5,
            tie_embeddings=True,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def lm_cpu(cls, **overrides) -> TransformerConfig:
        """The ``lm`` experiment's cpu model: 4 layers, width 512, 8 heads, SwiGLU 1408."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> TransformerConfig:
        """A model for unit tests and smoke runs: 2 layers, width 64, 4 / 2 heads."""
        base = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
        return cls(**{**base, **overrides})

    def __post_init__(self):
        checks = {
            "vocab_size": self.vocab_size > 0,
            "dim": self.dim > 0,
            "n_layers": self.n_layers > 0,
            "n_heads": self.n_heads > 0 and self.dim % self.n_heads == 0,
            "n_kv_heads": self.n_kv_heads > 0 and self.n_heads % max(self.n_kv_heads, 1) == 0,
            "ffn_dim": self.ffn_dim > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"TransformerConfig.{name}={getattr(self, name)!r} is invalid "
                    "(dim must divide by n_heads, n_heads by n_kv_heads, dropout in [0, 1))"
                )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"TransformerConfig.dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}"
            )
        if self.param_dtype not in DTYPES:
            raise ValueError(
                f"TransformerConfig.param_dtype={self.param_dtype!r}; allowed: {', '.join(DTYPES)}"
            )
        if not isinstance(self.remat, bool) and self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"TransformerConfig.remat={self.remat!r}; allowed: false, true, "
                + ", ".join(REMAT_POLICIES)
            )
        if self.moe is not None and self.n_layers % self.moe.every:
            raise ValueError(
                f"TransformerConfig.n_layers={self.n_layers} must divide by moe.every="
                f"{self.moe.every} (one MoE layer per run of `every` layers)"
            )

        if self.mod is not None and self.n_layers % self.mod.every:
            raise ValueError(
                f"TransformerConfig.n_layers={self.n_layers} must divide by mod.every="
                f"{self.mod.every} (one routed layer per run of `every` layers)"
            )
        if self.mod is not None and self.mod.router == "frame_topr":
            raise ValueError(
                "TransformerConfig.mod.router='frame_topr' needs frame ids; allowed in the "
                "decoder: 'topk', 'threshold' (jaxeff.nn.videollm routes frames)"
            )
        if self.attention not in (None, *ATTENTION_IMPLEMENTATIONS):
            raise ValueError(
                f"TransformerConfig.attention={self.attention!r}; allowed: None (per backend), "
                + ", ".join(ATTENTION_IMPLEMENTATIONS)
            )
        if self.mod is not None and self.moe is not None:
            raise ValueError("TransformerConfig: set at most one of moe and mod, not both")

    @property
    def n_mod_layers(self) -> int:
        return 0 if self.mod is None else self.n_layers // self.mod.every

    @property
    def n_moe_layers(self) -> int:
        return 0 if self.moe is None else self.n_layers // self.moe.every

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def compute_dtype(self):
        import jax.numpy as jnp

        return getattr(jnp, self.dtype)

    @property
    def param_jnp_dtype(self):
        """``param_dtype`` as a jnp dtype (imports jax)."""
        import jax.numpy as jnp

        return getattr(jnp, self.param_dtype)

    @property
    def remat_policy(self) -> str:
        """``remat`` by its canonical name: ``"none"``, ``"full"`` (True, ``nothing_saveable``),
        ``"dots_saveable"``, ``"dots_with_no_batch_dims_saveable"`` or ``"offload_dots"``."""
        if isinstance(self.remat, bool):
            return "full" if self.remat else "none"
        return "full" if self.remat == "nothing_saveable" else self.remat

    def num_params(self, active: bool = False) -> int:
        """Parameter count, embeddings included (the tied head counted once); ``active``
        counts only the ``top_k`` experts a token uses in MoE layers."""
        d, f, h = self.dim, self.ffn_dim, self.head_dim
        attn = d * h * (self.n_heads * 2 + self.n_kv_heads * 2)
        block = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        blocks = self.n_layers * block
        if self.moe is not None:
            m = self.moe
            experts = m.top_k if active else m.num_experts
            moe_block = attn + 2 * d + d * m.num_experts + 3 * experts * d * m.expert_dim
            moe_block += 3 * d * f if m.residual else 0
            blocks = (self.n_layers - self.n_moe_layers) * block + self.n_moe_layers * moe_block
        if self.mod is not None:
            hidden = self.mod.predictor_hidden
            predictor = (d * hidden + hidden + hidden + 1) if hidden else 0
            blocks += self.n_mod_layers * (d + 1 + predictor)
        return self.vocab_size * d + blocks + d + head


@dataclasses.dataclass(frozen=True)
class VideoLLMConfig:
    """Shape of the clips, the text, the decoder and where it routes.

    Attributes:
      frames, height, width, patch: clips ``[frames, height, width, 3]`` cut into
        ``patch x patch`` patches (height and width must divide by ``patch``).
      max_scenes: caption blocks reserved per clip (a clip with fewer scenes pads the rest).
      caption_len: tokens per caption block: ``<caption>``, the words, ``<eos>``, padding.
      text_vocab: size of the caption tokenizer's vocabulary; two ids follow it for
        ``<frame>`` (``text_vocab``) and ``<caption>`` (``text_vocab + 1``).
      dim, n_layers, n_heads, n_kv_heads, ffn_dim: the decoder.
      route_every: layer ``i`` is routed when ``i % route_every == route_every - 1``.
      attention: `TransformerConfig.attention` of the decoder (None: per backend; ``"pallas"``:
        jaxeff's flash-attention kernels).
      routing: `ModConfig.implementation` of the routed layers (None / ``"xla"``, ``"pallas"``).
    """

    frames: int = 16
    height: int = 32
    width: int = 32
    patch: int = 4
    max_scenes: int = 2
    caption_len: int = 48
    text_vocab: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 384
    route_every: int = 2
    attention: str | None = None
    routing: str | None = None

    def __post_init__(self):
        for name in ("frames", "height", "width", "patch", "max_scenes", "dim", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VideoLLMConfig.{name} must be a positive integer, got {value!r}")
        if self.routing not in MOD_IMPLEMENTATIONS:
            raise ValueError(
                f"VideoLLMConfig.routing={self.routing!r}; allowed: {MOD_IMPLEMENTATIONS}"
            )
        if self.attention not in (None, *ATTENTION_IMPLEMENTATIONS):
            raise ValueError(
                f"VideoLLMConfig.attention={self.attention!r}; allowed: None, "
                + ", ".join(ATTENTION_IMPLEMENTATIONS)
            )
        if self.height % self.patch or self.width % self.patch:
            raise ValueError(
                f"VideoLLMConfig.patch={self.patch} must divide height={self.height} and "
                f"width={self.width}"
            )
        if self.caption_len < 3:
            raise ValueError(
                f"VideoLLMConfig.caption_len must be >= 3 (<caption>, a word, <eos>), got "
                f"{self.caption_len}"
            )
        if self.text_vocab < 2:
            raise ValueError(f"VideoLLMConfig.text_vocab must be >= 2, got {self.text_vocab}")
        if not isinstance(self.route_every, int) or self.route_every < 1:
            raise ValueError(f"VideoLLMConfig.route_every must be >= 1, got {self.route_every}")
        if self.n_layers % self.route_every:
            raise ValueError(
                f"VideoLLMConfig.n_layers={self.n_layers} must divide by route_every="
                f"{self.route_every}"
            )
        self.transformer()  # checks heads, kv heads, head_dim

    @property
    def patches_per_frame(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * 3

    @property
    def num_vision(self) -> int:
        return self.frames * self.patches_per_frame

    @property
    def num_text(self) -> int:
        """Text positions per clip: one ``<frame>`` per frame and the caption blocks."""
        return self.frames + self.max_scenes * self.caption_len

    @property
    def seq_len(self) -> int:
        return self.num_vision + self.num_text

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + 2

    @property
    def frame_id(self) -> int:
        return self.text_vocab

    @property
    def caption_id(self) -> int:
        return self.text_vocab + 1

    def routed_layers(self) -> tuple[int, ...]:
        return tuple(
            i for i in range(self.n_layers) if i % self.route_every == self.route_every - 1
        )

    def routed_tokens(self, r: float) -> int:
        """Tokens a routed layer computes: every text token and ``max(1, floor(r P))`` per
        frame."""
        if not (isinstance(r, int | float) and 0.0 < r <= 1.0):
            raise ValueError(f"r must be a number in (0, 1], got {r!r}")
        keep = max(1, int(math.floor(r * self.patches_per_frame + 1e-9)))
        return self.num_text + self.frames * keep

    def transformer(self) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.vocab_size,
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            ffn_dim=self.ffn_dim,
            max_seq_len=self.seq_len,
            attention=self.attention,
        )


@dataclasses.dataclass(frozen=True)
class VideoDenoiserConfig:
    """Shape of :class:`VideoDenoiser`: clips ``[B, frames, height, width, channels]``."""

    frames: int = 8
    height: int = 16
    width: int = 16
    channels: int = 3
    patch: int = 4
    dim: int = 64
    heads: int = 4
    depth: int = 2
    mlp_ratio: int = 4

    def __post_init__(self):
        for name in ("height", "width"):
            if getattr(self, name) % self.patch:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be divisible by patch ({self.patch})"
                )
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")

    @property
    def patches(self) -> int:
        """``S``: patches per frame."""
        return (self.height // self.patch) * (self.width // self.patch)


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    src_vocab: int = 512
    tgt_vocab: int = 512
    dim: int = 128
    n_heads: int = 4
    ffn_dim: int = 256
    enc_layers: int = 2
    dec_layers: int = 2
    max_len: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"Seq2SeqConfig.dim={self.dim} must divide by n_heads={self.n_heads}")
        for name in ("src_vocab", "tgt_vocab", "dim", "ffn_dim", "enc_layers", "dec_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"Seq2SeqConfig.{name} must be >= 1, got {getattr(self, name)}")
