"""CTR prediction models over categorical fields (Flax NNX): LR, FM, DNN, WideDeep, DeepFM, DCN,
DCNv2.

Every model maps feature ids ``[batch, n_fields]`` (column ``f`` indexes field ``f``'s vocabulary)
to logits ``[batch]``. Each field has its own embedding table, a ``[vocab, dim]`` parameter at
the exact path ``embedding/tables/<field name>`` (see `CTRModel.table_paths`), so that Helen can
name tables exactly; first-order ("wide") weights live at ``linear/tables/<field name>`` with
``dim = 1`` and are dense parameters for Helen, as in the reference implementation.

References:
  Rendle, Factorization Machines, ICDM 2010. Cheng et al., Wide & Deep Learning for Recommender
  Systems, 2016 (https://arxiv.org/abs/1606.07792). Guo et al., DeepFM, IJCAI 2017
  (https://arxiv.org/abs/1703.04247). Wang et al., Deep & Cross Network, ADKDD 2017
  (https://arxiv.org/abs/1708.05123). Wang et al., DCN V2, WWW 2021
  (https://arxiv.org/abs/2008.13535). Layouts follow FuxiCTR/BARS.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "DCN",
    "DCNv2",
    "DNN",
    "FM",
    "LR",
    "MODELS",
    "CTRModel",
    "CrossNet",
    "CrossNetV2",
    "DeepFM",
    "FieldEmbedding",
    "MLP",
    "WideDeep",
    "fm_pairwise",
]


def _field_names(vocab_sizes: Sequence[int], field_names: Sequence[str] | None) -> tuple[str, ...]:
    names = (
        tuple(field_names)
        if field_names is not None
        else tuple(f"f{i}" for i in range(len(vocab_sizes)))
    )
    if len(names) != len(vocab_sizes):
        raise ValueError(f"got {len(names)} field names for {len(vocab_sizes)} vocab sizes")
    if len(set(names)) != len(names):
        raise ValueError(f"field names must be distinct, got {list(names)}")
    bad = [n for n in names if not n or "/" in n]
    if bad:
        raise ValueError(f"field names must be non-empty and contain no '/': {bad}")
    return names


class FieldEmbedding(nnx.Module):
    """One ``[vocab_f, dim]`` table per field, at ``tables/<field name>``.

    Args:
      vocab_sizes: rows of each field's table.
      dim: embedding width (1 for first-order weights).
      field_names: table names (default ``f0, f1, ...``).
      init_std: standard deviation of the normal initialisation.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        dim: int,
        *,
        field_names: Sequence[str] | None = None,
        init_std: float = 1e-2,
        rngs: nnx.Rngs,
    ):
        self.field_names = _field_names(vocab_sizes, field_names)
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        self.dim = dim
        self.tables = nnx.Dict(
            {
                name: nnx.Param(init_std * jax.random.normal(rngs.params(), (v, dim)))
                for name, v in zip(self.field_names, self.vocab_sizes, strict=True)
            }
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """``[batch, n_fields]`` ids to ``[batch, n_fields, dim]`` embeddings."""
        if ids.ndim != 2 or ids.shape[1] != len(self.field_names):
            raise ValueError(
                f"ids must have shape [batch, {len(self.field_names)}], got {tuple(ids.shape)}"
            )
        cols = [self.tables[n][...][ids[:, f]] for f, n in enumerate(self.field_names)]
        return jnp.stack(cols, axis=1)


class MLP(nnx.Module):
    """ReLU multilayer perceptron; the last layer has no activation when ``out_dim`` is given."""

    def __init__(
        self, in_dim: int, hidden: Sequence[int], out_dim: int | None = None, *, rngs: nnx.Rngs
    ):
        dims = [in_dim, *hidden]
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:], strict=True)]
        )
        self.out = nnx.Linear(dims[-1], out_dim, rngs=rngs) if out_dim else None
        self.out_dim = out_dim or dims[-1]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.out(x) if self.out is not None else x


def fm_pairwise(emb: jax.Array) -> jax.Array:
    """FM's second-order term ``sum_{i<j} <e_i, e_j>`` for ``[batch, fields, dim]`` embeddings,
    computed as ``0.5 * sum_d ((sum_i e_id)^2 - sum_i e_id^2)`` in O(fields * dim)."""
    s = jnp.sum(emb, axis=1)
    return 0.5 * jnp.sum(s * s - jnp.sum(emb * emb, axis=1), axis=-1)


class CrossNet(nnx.Module):
    """DCN's cross network: ``x_{l+1} = x_0 (x_l . w_l) + b_l + x_l``."""

    def __init__(self, dim: int, n_layers: int, *, rngs: nnx.Rngs):
        std = dim**-0.5
        self.w = nnx.Param(std * jax.random.normal(rngs.params(), (n_layers, dim)))
        self.b = nnx.Param(jnp.zeros((n_layers, dim)))

    def __call__(self, x0: jax.Array) -> jax.Array:
        x = x0
        for w, b in zip(self.w[...], self.b[...], strict=True):
            x = x0 * (x @ w)[:, None] + b + x
        return x


class CrossNetV2(nnx.Module):
    """DCNv2's full-rank cross network: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``."""

    def __init__(self, dim: int, n_layers: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(dim, dim, rngs=rngs) for _ in range(n_layers)])

    def __call__(self, x0: jax.Array) -> jax.Array:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class CTRModel(nnx.Module):
    """Base class: field embeddings plus a head; subclasses define ``logits``.

    Args:
      vocab_sizes: rows of each field's table.
      embed_dim: embedding width.
      field_names: table names (default ``f0, f1, ...``).
      hidden: widths of the DNN tower (models with one).
      cross_layers: depth of the cross network (DCN, DCNv2).
      init_std: standard deviation of the embedding initialisation.
      rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    uses_linear = False
    uses_embedding = True

    def __init__(
        self,
        vocab_sizes: Sequence[int],
        embed_dim: int = 8,
        *,
        field_names: Sequence[str] | None = None,
        hidden: Sequence[int] = (64, 64),
        cross_layers: int = 2,
        init_std: float = 1e-2,
        rngs: nnx.Rngs,
    ):
        self.field_names = _field_names(vocab_sizes, field_names)
        self.n_fields = len(self.field_names)
        self.embed_dim = embed_dim
        if self.uses_embedding:
            self.embedding = FieldEmbedding(
                vocab_sizes, embed_dim, field_names=self.field_names, init_std=init_std, rngs=rngs
            )
        if self.uses_linear:
            self.linear = FieldEmbedding(
                vocab_sizes, 1, field_names=self.field_names, init_std=init_std, rngs=rngs
            )
            self.bias = nnx.Param(jnp.zeros(()))
        self.build(hidden=tuple(hidden), cross_layers=cross_layers, rngs=rngs)

    def build(self, *, hidden, cross_layers, rngs):  # noqa: D102 - overridden
        pass

    def table_paths(self) -> list[str]:
        """Exact parameter paths of the ``[vocab, dim]`` embedding tables, in field order (what
        `jaxeff.optim.scale_by_helen` takes as ``tables``)."""
        if not self.uses_embedding:
            return []
        return [f"embedding/tables/{n}" for n in self.field_names]

    def first_order(self, ids: jax.Array) -> jax.Array:
        return self.bias[...] + jnp.sum(self.linear(ids)[..., 0], axis=1)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.logits(ids)

    def logits(self, ids: jax.Array) -> jax.Array:
        raise NotImplementedError


class LR(CTRModel):
    """Logistic regression: ``b + sum_f w_f[id_f]``."""

    uses_linear = True
    uses_embedding = False

    def logits(self, ids):
        return self.first_order(ids)


class FM(CTRModel):
    """Factorization machine: first order plus ``sum_{i<j} <e_i, e_j>``."""

    uses_linear = True

    def logits(self, ids):
        return self.first_order(ids) + fm_pairwise(self.embedding(ids))


class DNN(CTRModel):
    """An MLP over the concatenated field embeddings."""

    def build(self, *, hidden, cross_layers, rngs):
        self.mlp = MLP(self.n_fields * self.embed_dim, hidden, 1, rngs=rngs)

    def logits(self, ids):
        return self.mlp(self.embedding(ids).reshape(ids.shape[0], -1))[:, 0]


class WideDeep(DNN):
    """Wide & Deep: first-order (wide) weights plus the DNN tower."""

    uses_linear = True

    def logits(self, ids):
        return self.first_order(ids) + super().logits(ids)


class DeepFM(DNN):
    """DeepFM: first order, FM pairwise term and a DNN, all on the same embeddings."""

    uses_linear = True

    def logits(self, ids):
        emb = self.embedding(ids)
        deep = self.mlp(emb.reshape(ids.shape[0], -1))[:, 0]
        return self.first_order(ids) + fm_pairwise(emb) + deep


class DCN(CTRModel):
    """Deep & Cross: a cross network and a DNN in parallel, concatenated into a linear head."""

    cross_cls = CrossNet

    def build(self, *, hidden, cross_layers, rngs):
        dim = self.n_fields * self.embed_dim
        self.cross = self.cross_cls(dim, cross_layers, rngs=rngs)
        self.mlp = MLP(dim, hidden, rngs=rngs) if hidden else None
        head_in = dim + (self.mlp.out_dim if self.mlp is not None else 0)
        self.head = nnx.Linear(head_in, 1, rngs=rngs)

    def logits(self, ids):
        x0 = self.embedding(ids).reshape(ids.shape[0], -1)
        parts = [self.cross(x0)]
        if self.mlp is not None:
            parts.append(self.mlp(x0))
        return self.head(jnp.concatenate(parts, axis=-1))[:, 0]


class DCNv2(DCN):
    """DCN V2 (parallel structure): the full-rank cross network and a DNN."""

    cross_cls = CrossNetV2


MODELS = {
    "lr": LR,
    "fm": FM,
    "dnn": DNN,
    "widedeep": WideDeep,
    "deepfm": DeepFM,
    "dcn": DCN,
    "dcnv2": DCNv2,
}
