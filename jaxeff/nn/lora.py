"""LoRA: low-rank adapters on chosen linear projections of a jaxeff model.

A frozen projection ``y = x W`` (``W [d_in, d_out]``) gains a trainable low-rank update::

    y = x W + (alpha / r) * (x A) B,    A [d_in, r],  B [r, d_out]

``A`` is drawn from a Kaiming-uniform-like ``U(-1/sqrt(d_in), 1/sqrt(d_in))`` and ``B`` starts
at zero, so the adapted model equals the base model before training. Only ``A`` and ``B``
(``nnx.LoRAParam``) are trained; the base weights stay as they are. After training the update can
be folded into the kernel (`merge_lora`: ``W' = W + (alpha / r) A B``), which gives the same
function with no extra cost at inference, or kept separate and saved alone (`save_adapter`,
`load_adapter`: an orbax checkpoint of the LoRA parameters plus a JSON config).

The decoder's blocks are stacked on a leading ``layers`` axis (`jaxeff.nn.transformer`), so the
adapters of a stacked projection are stacked too (``A [L, d_in, r]``, ``B [L, r, d_out]``) and
the layer scan slices them together with the kernel.

Reference:
  Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022.
  https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxeff.nn.transformer import Linear

# Projection names of `jaxeff.nn.transformer` blocks that LoRA can wrap.
ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")
TARGETS = ATTENTION + MLP

_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_DIR = "adapter"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, their rank and scale.

    Attributes:
      rank: ``r``, the inner dimension of ``A B`` (>= 1).
      alpha: the update is scaled by ``alpha / rank`` (the paper's alpha).
      targets: projection names (from ``q k v o gate up down``).
      seed: seed of ``A``'s initialisation.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRAConfig.rank must be >= 1, got {self.rank}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(
                f"LoRAConfig.targets={tuple(self.targets)!r} is invalid; allowed (at least one): "
                f"{', '.join(TARGETS)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nnx.Module):
    """``y = x W + scale * (x A) B`` around an existing `Linear`'s kernel.

    The kernel may carry leading stacked axes (``[..., d_in, d_out]``); ``A`` and ``B`` get the
    same ones. ``W`` keeps its variable type (``nnx.Param``); ``A`` and ``B`` are
    ``nnx.LoRAParam``.
    """

    def __init__(self, base: Linear, rank: int, scale: float, *, key: jax.Array):
        kernel = base.kernel[...]
        *lead, d_in, d_out = kernel.shape
        bound = 1.0 / d_in**0.5
        self.kernel = base.kernel
        self.lora_a = nnx.LoRAParam(
            jax.random.uniform(key, (*lead, d_in, rank), jnp.float32, -bound, bound)
        )
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, d_out), jnp.float32))
        self.scale = float(scale)

    def __call__(self, x):
        kernel, a, b = self.kernel[...], self.lora_a[...], self.lora_b[...]
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])  # 2-D matmuls: see `jaxeff.nn.transformer.Linear`
        y = flat @ kernel.astype(x.dtype)
        y = y + ((flat @ a.astype(x.dtype)) @ b.astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)
        return y.reshape(*lead, kernel.shape[-1])

    def merged_kernel(self) -> jax.Array:
        """``W + scale * A B`` (over any stacked axes)."""
        return self.kernel[...] + self.scale * jnp.matmul(self.lora_a[...], self.lora_b[...])


def _walk(module: nnx.Module, visit: Callable[[nnx.Module, str, nnx.Module], None]) -> None:
    """Calls ``visit(parent, name, child)`` for every sub-module (depth first, children
    before their own children are visited, so ``visit`` may replace the child)."""
    for name, child in list(vars(module).items()):
        if isinstance(child, nnx.Module):
            visit(module, name, child)
            _walk(getattr(module, name), visit)


def apply_lora(model: nnx.Module, cfg: LoRAConfig) -> nnx.Module:
    """Wraps every `Linear` named in ``cfg.targets`` with a `LoRALinear`, in place.

    Returns the same model object (for chaining). Raises ValueError when no projection matched
    or the model already has adapters.
    """
    key = jax.random.PRNGKey(cfg.seed)
    found: list[str] = []

    def visit(parent, name, child):
        nonlocal key
        if isinstance(child, LoRALinear):
            raise ValueError("apply_lora: the model already has LoRA adapters (merge them first)")
        if name in cfg.targets and isinstance(child, Linear):
            key, sub = jax.random.split(key)
            setattr(parent, name, LoRALinear(child, cfg.rank, cfg.scale, key=sub))
            found.append(name)

    _walk(model, visit)
    if not found:
        raise ValueError(
            f"apply_lora: no Linear projection named {', '.join(cfg.targets)} in the model"
        )
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its kernel (``W + scale A B``) and
    the `LoRALinear` replaced by a plain `Linear`: the same function, base cost."""
    merged = nnx.clone(model)

    def visit(parent, name, child):
        if isinstance(child, LoRALinear):
            linear = nnx.eval_shape(lambda: Linear(1, 1, std=0.0, rngs=nnx.Rngs(0)))
            linear.kernel = nnx.Param(child.merged_kernel())
            setattr(parent, name, linear)

    _walk(merged, visit)
    return merged


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapters' parameters (``nnx.LoRAParam`` leaves) of ``model``."""
    return nnx.state(model, nnx.LoRAParam)


def num_lora_params(model: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(lora_state(model))))


def save_adapter(directory: str, model: nnx.Module, cfg: LoRAConfig) -> str:
    """Saves only the adapters of ``model`` (orbax) and ``cfg`` (JSON) under ``directory``.

    The base model is not written: `load_adapter` puts the adapters back on a fresh copy of
    the same base model. Returns the directory.
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    state = nnx.to_pure_dict(lora_state(model))
    if not jax.tree.leaves(state):
        raise ValueError("save_adapter: the model has no LoRA adapters (see apply_lora)")
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, _WEIGHTS_DIR)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(weights, state, force=True)
        ckpt.wait_until_finished()
    with open(os.path.join(directory, _CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    return directory


def read_adapter_config(directory: str) -> LoRAConfig:
    """The `LoRAConfig` saved in ``directory/adapter_config.json`` (as `save_adapter` writes
    it: ``rank``, ``alpha``, ``targets`` and ``seed``); a ValueError names the file."""
    path = os.path.join(directory, _CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} is not a saved adapter: {_CONFIG_FILE} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        line = (str(err).splitlines() or [""])[0]
        raise ValueError(f"{path}: not valid JSON ({line})") from err
    allowed = {f.name for f in dataclasses.fields(LoRAConfig)}
    if not isinstance(data, dict) or set(data) - allowed:
        raise ValueError(f"{path}: expected an object with keys {sorted(allowed)}")
    targets = data.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        got = "missing" if "targets" not in data else repr(targets)
        raise ValueError(f"{path}: 'targets' must be a list of projection names, got {got}")
    for key, kinds, what in (
        ("rank", int, "an integer"),
        ("alpha", (int, float), "a number"),
        ("seed", int, "an integer"),
    ):
        value = data.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{path}: {key!r} must be {what}, got {value!r}")
    data["targets"] = tuple(targets)
    try:
        return LoRAConfig(**data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def load_adapter(directory: str, model: nnx.Module) -> nnx.Module:
    """Applies the saved adapter of ``directory`` to ``model`` (a base model without adapters,
    modified in place and returned); the adapter weights must fit the model's shapes."""
    import orbax.checkpoint as ocp

    cfg = read_adapter_config(directory)
    apply_lora(model, cfg)
    state = lora_state(model)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(state))
    try:
        with ocp.StandardCheckpointer() as ckpt:
            restored = ckpt.restore(os.path.join(os.path.abspath(directory), _WEIGHTS_DIR), target)
    except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many kinds
        line = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"adapter in {directory!r} is corrupt or does not fit the model "
            f"({type(err).__name__}: {line})"
        ) from err
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def trainable_filter(method: str):
    """The ``nnx`` filter of the parameters a method trains: ``lora`` -> ``nnx.LoRAParam``,
    ``full`` -> every ``nnx.Param`` (adapters included, if any)."""
    if method == "lora":
        return nnx.LoRAParam
    if method == "full":
        return nnx.Param
    raise ValueError(f"fine-tuning method {method!r}; allowed: lora, full")


def split_trainable(model: nnx.Module, method: str) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, trainable, frozen)``: ``nnx.merge(graphdef, trainable, frozen)`` rebuilds
    the model."""
    return nnx.split(model, trainable_filter(method), ...)


__all__: Sequence[str] = (
    "LoRAConfig",
    "LoRALinear",
    "apply_lora",
    "load_adapter",
    "lora_state",
    "merge_lora",
    "num_lora_params",
    "read_adapter_config",
    "save_adapter",
    "split_trainable",
    "trainable_filter",
)
