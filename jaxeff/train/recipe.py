"""The language-model training recipe that jaxeff's experiments share.

One decoder (`jaxeff.nn.transformer.Transformer`, configured by a
`jaxeff.nn.config.TransformerConfig`), next-token cross-entropy (`causal_lm_loss`), AdamW with a
warmup-cosine schedule and global-norm clipping (`OptimConfig.build`), packed windows of the
embedded corpora (`DataConfig`, `jaxeff.data.packing.build_lm_data`), the loop of
`jaxeff.train.loop.fit` (`TrainConfig.loop`), and optionally a named mesh (`place`):

    cfg = LMConfig(model=TransformerConfig(dim=256, n_layers=4))
    run = build(cfg)                    # LMRun: data, model_cfg, graphdef, state, steps
    trained = fit_lm(cfg, "runs/x")     # the same, placed on cfg.mesh and trained
    model, tokenizer = load_run("runs/x")

The model's vocabulary comes from the tokenizer: `LMConfig.model_for` (and `model_for_data`)
put the data's vocabulary size and ``data.seq_len`` into the model config, and refuse a
``model.vocab_size`` that disagrees with the data (the knob is ``data.vocab_size``).

The configs are plain frozen dataclasses and this module imports jax only inside its
functions, so an experiment can embed them (``--set model.n_layers=6``) and ``jaxeff list``
stays instant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxeff.nn.config import TransformerConfig
from jaxeff.parallel.mesh_config import MeshConfig

_DEFAULT_VOCAB = TransformerConfig.__dataclass_fields__["vocab_size"].default


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Packed windows of the embedded corpora (`jaxeff.data.packing.build_lm_data`)."""

    corpora: tuple[str, ...] = ("prose", "python")
    silos: tuple[str, ...] | None = None
    vocab_size: int = 4096  # requested BPE vocabulary; the model gets the tokenizer's size
    seq_len: int = 128
    max_bytes: int | None = 3_000_000
    val_fraction: float = 0.05


OPTIMIZERS = ("adamw", "came", "adafactor")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """``name`` (AdamW by default; CAME, `jaxeff.optim.came`; or optax's Adafactor) with linear
    warmup then cosine decay to 10% of the peak, after global-norm clipping (``clip_norm``
    None: no clipping). ``b1``, ``b2`` are AdamW's; CAME and Adafactor keep their defaults."""

    name: str = "adamw"
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float | None = 1.0

    def schedule(self, steps: int, peak: float | None = None):
        """The learning rate per step: 0 -> ``peak`` (default ``learning_rate``) over
        ``warmup_steps``, cosine to ``0.1 peak`` at ``steps``."""
        import optax

        peak = self.learning_rate if peak is None else peak
        return optax.warmup_cosine_decay_schedule(
            0.0,
            peak,
            max(self.warmup_steps, 1),
            max(steps, self.warmup_steps + 1),
            end_value=peak * 0.1,
        )

    def clipped(self, tx):
        """``tx`` after global-norm clipping at ``clip_norm`` (``tx`` itself when None)."""
        import optax

        if self.clip_norm is None:
            return tx
        return optax.chain(optax.clip_by_global_norm(self.clip_norm), tx)

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r}; allowed: {', '.join(OPTIMIZERS)}")
        for name in ("learning_rate", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"optim.{name}={getattr(self, name)!r} must be >= 0")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"optim.{name}={getattr(self, name)!r} must be in [0, 1)")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"optim.clip_norm={self.clip_norm!r} must be > 0 (or null: none)")

    def build(self, steps: int):
        """The optax transformation of a run of ``steps`` steps."""
        import optax

        schedule = self.schedule(steps)
        if self.name == "came":
            from jaxeff.optim import came

            return self.clipped(came(schedule, weight_decay=self.weight_decay))
        if self.name == "adafactor":
            return self.clipped(optax.adafactor(schedule))
        adamw = optax.adamw(schedule, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay)
        return self.clipped(adamw)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Batch size, length and cadence of a run; `loop` gives `jaxeff.train.loop.LoopConfig`."""

    batch_size: int = 16
    steps: int = 150
    log_every: int = 5
    eval_every: int = 50
    eval_batches: int = 16
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    progress: bool = True
    # the global batch is read as this many grain shards (0: one per process); runs with the
    # same value see the same batches whatever the number of processes
    data_shards: int = 0
    # grain worker processes per host (0: in the training process) and batches placed on the
    # devices ahead of their step
    data_workers: int = 0
    prefetch: int = 2
    # > 0: the vocabulary projection and cross-entropy run this many positions at a time
    # (`causal_lm_loss(chunk=...)`), so the [B, S, V] float32 logits never exist whole
    loss_chunk: int = 0

    def __post_init__(self):
        for name in (
            "batch_size",
            "steps",
            "log_every",
            "eval_batches",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train.{name}={value!r} must be an integer >= 1")
        for name in ("eval_every", "data_shards", "data_workers", "prefetch", "loss_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name}={getattr(self, name)!r} must be >= 0")

    def loop(self, **overrides):
        """The `LoopConfig` of these steps and cadences (``overrides`` replace fields)."""
        from jaxeff.train.loop import LoopConfig

        fields = {
            "steps": self.steps,
            "log_every": self.log_every,
            "eval_every": self.eval_every,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "progress": self.progress,
            "prefetch": self.prefetch,
        }
        return LoopConfig(**{**fields, **overrides})


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
    """A ``jax.profiler`` trace of the run's steps ``[first, last]`` (1-based, inclusive; one
    value: that step; empty: no trace) into ``<run>/profile`` (TensorBoard's profile plugin or
    Perfetto read it): ``--set profile.steps=[10,12]``."""

    steps: tuple[int, ...] = ()

    def __post_init__(self):
        s = tuple(self.steps)
        if s and (len(s) > 2 or min(s) < 1 or s[0] > s[-1]):
            raise ValueError(
                f"profile.steps={list(s)}; allowed: [first, last] with 1 <= first <= last, "
                "[step], or [] (no trace)"
            )


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A whole run. ``model`` defaults to the ``lm`` experiment's cpu decoder (width 512, 4
    layers, 8 heads, SwiGLU 1408, tied embeddings); its ``vocab_size`` and ``max_seq_len``
    come from the data (`model_for`)."""

    seed: int = 0
    data: DataConfig = DataConfig()
    model: TransformerConfig = TransformerConfig.lm_cpu()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    profile: ProfileConfig = ProfileConfig()

    @classmethod
    def smoke(cls, steps: int = 12) -> LMConfig:
        """Seconds on a CPU (what the tests run): a 2-layer width-64 decoder on 120 kB of
        prose, batch 8, ``steps`` steps, evaluated and checkpointed at half-way and the end."""
        half = max(steps // 2, 1)
        return cls(
            data=DataConfig(corpora=("prose",), vocab_size=512, seq_len=32, max_bytes=120_000),
            model=TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
            optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
            train=TrainConfig(
                batch_size=8,
                steps=steps,
                log_every=1,
                eval_every=half,
                eval_batches=2,
                checkpoint_every=half,
                progress=False,
            ),
        )

    def model_for(self, vocab_size: int) -> TransformerConfig:
        """``model`` with the tokenizer's ``vocab_size`` and ``max_seq_len = data.seq_len``."""
        return model_for_data(
            self.model, vocab_size, self.data.seq_len, requested_vocab=self.data.vocab_size
        )


def model_for_data(
    model: TransformerConfig,
    vocab_size: int,
    seq_len: int,
    *,
    requested_vocab: int | None = None,
    vocab_knob: str = "data.vocab_size",
    model_knob: str = "model",
) -> TransformerConfig:
    """``model`` with ``vocab_size`` (the tokenizer's) and ``max_seq_len = seq_len``.

    The vocabulary has one knob, the data's (``vocab_knob``): a ``model.vocab_size`` left at
    its default is replaced; one set to anything but the data's requested (``requested_vocab``)
    or actual size is a ValueError naming the knob.
    """
    allowed = {_DEFAULT_VOCAB, vocab_size, requested_vocab}
    if model.vocab_size not in allowed:
        raise ValueError(
            f"{model_knob}.vocab_size={model.vocab_size} disagrees with the data: the "
            f"tokenizer has {vocab_size} tokens. The vocabulary size comes from the data; set "
            f"{vocab_knob} instead (and leave {model_knob}.vocab_size at its default)"
        )
    return dataclasses.replace(model, vocab_size=vocab_size, max_seq_len=seq_len)


# ---------------------------------------------------------------------------------------------
# data


def build_data(d: DataConfig, seed: int):
    """`jaxeff.data.packing.LMData` of ``d`` (the split seeded by ``seed``)."""
    from jaxeff.data.packing import build_lm_data

    return build_lm_data(
        corpora=d.corpora,
        silos=d.silos,
        vocab_size=d.vocab_size,
        seq_len=d.seq_len,
        max_bytes=d.max_bytes,
        val_fraction=d.val_fraction,
        seed=seed,
    )


def check_batch_size(data, batch_size: int, knob: str = "train.batch_size") -> None:
    """ValueError naming ``knob`` when a batch needs more windows than the training split."""
    if batch_size > len(data.train):
        raise ValueError(
            f"{knob}={batch_size} exceeds the {len(data.train)} training windows; lower it or "
            "raise data.max_bytes"
        )


def val_batches(data, batch_size: int, max_batches: int):
    """Sequential validation batches (fixed order, at most ``max_batches``)."""
    import numpy as np

    n = len(data.val)
    bs = min(batch_size, n)
    for b in range(min(max_batches, n // bs)):
        yield {"tokens": np.stack([data.val[i]["tokens"] for i in range(b * bs, (b + 1) * bs)])}


def train_loader(source, cfg_train: TrainConfig, seed: int):
    """The grain loader of this process: its ``data_shards / processes`` shards of the global
    batch (`jaxeff.data.shards`); one shard is the plain loader. ``data_workers`` grain worker
    processes read ahead (a run resumes with the worker count it was saved with: grain
    batches per worker)."""
    import jax

    from jaxeff.data.packing import make_loader
    from jaxeff.data.shards import ShardedLoader

    shards = cfg_train.data_shards or jax.process_count()
    workers = cfg_train.data_workers
    if shards == 1:
        return make_loader(source, cfg_train.batch_size, seed=seed, worker_count=workers)
    return ShardedLoader(
        source,
        cfg_train.batch_size,
        seed,
        shards,
        jax.process_index(),
        jax.process_count(),
        worker_count=workers,
    )


# ---------------------------------------------------------------------------------------------
# placement on a mesh


@dataclasses.dataclass
class Placement:
    """Where a run's arrays live: ``mesh`` is None on one device (nothing is placed)."""

    mesh: object = None
    state: object = None  # TrainState of NamedShardings
    batch: object = None  # {"tokens": NamedSharding}

    def train_batch(self, batch):
        """This process's rows -> global arrays (a no-op without a mesh)."""
        from jaxeff.parallel.mesh import host_local_to_global

        return batch if self.mesh is None else host_local_to_global(batch, self.batch)

    def eval_batch(self, batch):
        """A batch every process holds whole -> global arrays."""
        from jaxeff.parallel.mesh import global_from_replicated

        return batch if self.mesh is None else global_from_replicated(batch, self.batch)

    @property
    def step_shardings(self):
        from jaxeff.train.loop import StepShardings

        return None if self.mesh is None else StepShardings(self.state, self.batch)


def placement(mesh_cfg: MeshConfig, state, param_axes, batch_size: int, seq_len: int) -> Placement:
    """The `Placement` of a train state on the mesh of ``mesh_cfg``: its mesh and the shardings
    of every state leaf and of a batch. ``state`` may be abstract (``jax.ShapeDtypeStruct``
    leaves, from `abstract_train_state`): only shapes are read. A trivial mesh in a single
    process places nothing."""
    import jax
    import numpy as np

    from jaxeff.parallel import mesh as mesh_lib
    from jaxeff.train.state import train_state_shardings

    if mesh_cfg.is_trivial and jax.process_count() == 1:
        return Placement()
    mesh = mesh_lib.mesh_from_config(mesh_cfg)
    pieces = mesh_lib.batch_shard_count(mesh)
    if batch_size % pieces:
        raise ValueError(
            f"train.batch_size={batch_size} must divide by the mesh's batch axes data x fsdp "
            f"= {pieces}"
        )
    if pieces % jax.process_count():
        raise ValueError(
            f"mesh data x fsdp = {pieces} must divide by the process count "
            f"{jax.process_count()}: each process feeds its own rows of the batch"
        )
    shardings = train_state_shardings(state, param_axes, mesh)
    example = {"tokens": np.zeros((batch_size, seq_len + 1), np.int32)}
    return Placement(mesh, shardings, mesh_lib.batch_shardings(example, mesh))


def place(mesh_cfg: MeshConfig, state, param_axes, batch_size: int, seq_len: int):
    """An existing (host-side, whole) train state placed on the mesh of ``mesh_cfg``, and the
    run's `Placement`: every process holds the whole state and places the slices its devices
    own. For models that fit one host; `build` with ``on_mesh=True`` creates the state
    directly sharded instead."""
    import jax

    from jaxeff.parallel import mesh as mesh_lib

    where = placement(mesh_cfg, state, param_axes, batch_size, seq_len)
    if where.mesh is None:
        return state, where
    return mesh_lib.global_from_replicated(jax.device_get(state), where.state), where


def check_mesh_axes(mesh_cfg: MeshConfig, model_cfg: TransformerConfig) -> None:
    """ValueError for mesh axes the LM recipe would only duplicate work on: ``seq`` (the
    decoder's activations are not split over the sequence here; sequence parallelism is
    `jaxeff.parallel.sequence`, experiment ``dsp-train``) and ``expert`` without MoE layers;
    ``clients`` belongs to the federated experiments."""
    if mesh_cfg.seq != 1:
        raise ValueError(
            f"mesh.seq={mesh_cfg.seq}: the lm recipe does not split the sequence, so a seq axis "
            "would only replicate work; use mesh.data / mesh.fsdp / mesh.tensor (sequence "
            "parallelism: dsp-train)"
        )
    if mesh_cfg.expert != 1 and model_cfg.moe is None:
        raise ValueError(
            f"mesh.expert={mesh_cfg.expert} needs MoE layers (model.moe); a dense model would "
            "only replicate work over it; use mesh.data / mesh.fsdp / mesh.tensor"
        )
    if mesh_cfg.clients != 1:
        raise ValueError(
            f"mesh.clients={mesh_cfg.clients} belongs to the federated experiments (photon, "
            "dept); use mesh.data / mesh.fsdp / mesh.tensor"
        )


# ---------------------------------------------------------------------------------------------
# building and training a run


def init_model(model_cfg: TransformerConfig, seed: int):
    """``(graphdef, params)`` of a Transformer, initialised under one ``jit`` (eager
    initialisation compiles one small program per parameter shape)."""
    import jax
    from flax import nnx

    from jaxeff.nn.transformer import Transformer

    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
    params = jax.jit(lambda: nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))[1])()
    return graphdef, params


def abstract_train_state(model_cfg: TransformerConfig, tx, seed: int = 0):
    """``(graphdef, state)``: the model's graphdef and its `TrainState` as
    ``jax.ShapeDtypeStruct`` leaves (``nnx.eval_shape`` + ``jax.eval_shape``): shapes and dtypes
    of parameters and optimizer state, nothing allocated."""
    import jax
    from flax import nnx

    from jaxeff.nn.transformer import Transformer
    from jaxeff.train.state import create_train_state

    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))
    graphdef, params = nnx.split(model)
    return graphdef, jax.eval_shape(lambda p: create_train_state(p, tx, seed), params)


def init_train_state(model_cfg: TransformerConfig, tx, seed: int, shardings=None):
    """The initial `TrainState` (parameters from ``seed``, ``tx.init``), made by one
    ``jax.jit`` whose ``out_shardings`` are ``shardings`` (a `TrainState` of shardings, or None:
    one device): each device computes only its own slices (MaxText's sharded init), so the
    whole state never exists on one device or host."""
    import jax
    from flax import nnx

    from jaxeff.nn.transformer import Transformer
    from jaxeff.train.state import create_train_state

    def make():
        params = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))[1]
        return create_train_state(params, tx, seed)

    return jax.jit(make, out_shardings=shardings)()


def with_shardings(abstract, shardings):
    """``abstract`` (a tree of shape structs) with ``shardings`` attached: the restore target
    of a checkpoint that orbax reads straight into its shards."""
    import jax

    if shardings is None:
        return abstract
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


@dataclasses.dataclass
class LMRun:
    """What `build` makes of an `LMConfig`: the data (`jaxeff.data.packing.LMData`), the
    resolved model config, the model's graphdef, the initial `TrainState` (None when built
    with ``init=False``), the optax transformation, the jitted train and eval steps
    (`jaxeff.train.loop`), the `Placement` and the abstract state (shape structs with the
    placement's shardings: the restore target)."""

    data: Any
    model_cfg: TransformerConfig
    graphdef: Any
    state: Any
    tx: Any
    train_step: Any
    eval_step: Any
    placement: Placement = dataclasses.field(default_factory=Placement)
    abstract_state: Any = None
    seed: int = 0

    def init_state(self):
        """The initial state on the placement (`init_train_state`)."""
        return init_train_state(self.model_cfg, self.tx, self.seed, self.placement.state)


def loss_fn(cfg: LMConfig):
    """The recipe's loss: `causal_lm_loss`, ``train.loss_chunk`` positions of the vocabulary
    projection at a time when set (the full ``[B, S, V]`` logits never materialized)."""
    import functools

    from jaxeff.train.losses import causal_lm_loss

    chunk = cfg.train.loss_chunk
    return functools.partial(causal_lm_loss, chunk=chunk) if chunk else causal_lm_loss


def _abstract_run(cfg: LMConfig, vocab_size: int, on_mesh: bool):
    """``(model_cfg, tx, graphdef, abstract_state, placement)`` of ``cfg`` with the tokenizer's
    ``vocab_size``: nothing allocated; the placement on ``cfg.mesh`` when ``on_mesh``."""
    from jaxeff.nn.transformer import param_logical_axes

    model_cfg = cfg.model_for(vocab_size)
    tx = cfg.optim.build(cfg.train.steps)
    graphdef, abstract = abstract_train_state(model_cfg, tx, cfg.seed)
    where = Placement()
    if on_mesh:
        check_mesh_axes(cfg.mesh, model_cfg)
        axes = param_logical_axes(abstract.params)
        where = placement(cfg.mesh, abstract, axes, cfg.train.batch_size, cfg.data.seq_len)
    return model_cfg, tx, graphdef, abstract, where


def build(cfg: LMConfig, data=None, *, on_mesh: bool = False, init: bool = True) -> LMRun:
    """The data, model, initial train state and step functions of a run. ``data``: already
    built `LMData` of ``cfg.data``. ``on_mesh``: the state is created directly sharded on
    ``cfg.mesh`` (`init_train_state`) and the steps compiled for it; otherwise one device.
    ``init=False`` leaves ``state`` None (a run that restores a checkpoint into
    ``abstract_state`` never builds the initial one)."""
    from jaxeff.train.loop import make_eval_step, make_train_step

    data = build_data(cfg.data, cfg.seed) if data is None else data
    model_cfg, tx, graphdef, abstract, where = _abstract_run(cfg, data.vocab_size, on_mesh)
    state = init_train_state(model_cfg, tx, cfg.seed, where.state) if init else None
    shardings = where.step_shardings
    loss = loss_fn(cfg)
    train_step = make_train_step(graphdef, tx, loss, shardings=shardings)
    eval_step = make_eval_step(graphdef, loss, shardings=shardings)
    abstract = with_shardings(abstract, where.state)
    return LMRun(
        data, model_cfg, graphdef, state, tx, train_step, eval_step, where, abstract, cfg.seed
    )


@dataclasses.dataclass
class TrainedLM:
    """`fit_lm`'s result: the (placed) run, its final state and every metric record."""

    run: LMRun
    state: Any
    records: list
    placement: Placement


def fit_lm(cfg: LMConfig, workdir: str, resume: bool = False) -> TrainedLM:
    """Builds the run of ``cfg`` directly sharded on ``cfg.mesh`` and trains it with
    `jaxeff.train.loop.fit` under ``workdir`` (metrics, checkpoints with the config in their
    metadata, ``tokenizer.json``), evaluating on `val_batches`. A resumed run restores its
    checkpoint straight into the shardings and never builds the initial state."""
    import jax

    from jaxeff import config as config_lib
    from jaxeff.train.loop import evaluate, fit
    from jaxeff.train.metrics import join, write_text

    run = build(cfg, on_mesh=True, init=False)
    t = cfg.train
    check_batch_size(run.data, t.batch_size)
    where = run.placement
    loader = train_loader(run.data.train, t, cfg.seed)

    def eval_fn(params):
        batches = val_batches(run.data, t.batch_size, t.eval_batches)
        return evaluate(run.eval_step, params, map(where.eval_batch, batches))

    meta = {"config": config_lib.to_dict(cfg), "vocab_size": run.data.vocab_size}
    if jax.process_index() == 0:
        write_text(join(workdir, "tokenizer.json"), run.data.tokenizer.to_str())
    state, records = fit(
        run.abstract_state,
        run.train_step,
        loader,
        workdir,
        t.loop(profile_steps=tuple(cfg.profile.steps)),
        eval_fn=eval_fn,
        resume=resume,
        meta=meta,
        to_device=where.train_batch if where.mesh is not None else None,
        init_state=run.init_state,
    )
    return TrainedLM(dataclasses.replace(run, state=state), state, records, where)


def load_run(workdir: str, step: int | None = None):
    """``(model, tokenizer)``: the trained model of a `fit_lm` run directory (the newest
    checkpoint, or ``step``) and its tokenizer."""
    import jax
    from etils import epath
    from flax import nnx
    from tokenizers import Tokenizer

    from jaxeff import config as config_lib
    from jaxeff.nn.transformer import Transformer
    from jaxeff.train.checkpoint import Checkpointer
    from jaxeff.train.metrics import join
    from jaxeff.train.state import create_train_state

    ckpt = Checkpointer(join(workdir, "checkpoints"))
    try:
        meta = ckpt.restore_meta(step)
        cfg = config_lib.from_dict(LMConfig, meta["config"])
        tokenizer = Tokenizer.from_str(epath.Path(join(workdir, "tokenizer.json")).read_text())
        model_cfg = cfg.model_for(meta["vocab_size"])
        abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
        graphdef, params = nnx.split(abstract)
        tx = cfg.optim.build(cfg.train.steps)
        abstract_state = jax.eval_shape(lambda p: create_train_state(p, tx, 0), params)
        state, _, _ = ckpt.restore(abstract_state, step)
    finally:
        ckpt.close()
    return nnx.merge(graphdef, jax.device_get(state.params)), tokenizer


def lowerable_step(cfg: LMConfig):
    """``(train_step, (abstract_state, abstract_batch))`` of ``cfg`` on the devices of this
    process (``cfg.mesh``), for ``jaxeff lower``: shape structs with their shardings, from
    `abstract_train_state`; no data is built and nothing is materialized. The vocabulary is
    the requested ``data.vocab_size`` (a trained tokenizer may come out a little smaller)."""
    import jax
    import jax.numpy as jnp

    from jaxeff.train.loop import make_train_step

    t = cfg.train
    _, tx, graphdef, abstract, where = _abstract_run(cfg, cfg.data.vocab_size, on_mesh=True)
    step = make_train_step(graphdef, tx, loss_fn(cfg), shardings=where.step_shardings)
    tokens_sharding = None if where.mesh is None else where.batch["tokens"]
    batch = {
        "tokens": jax.ShapeDtypeStruct(
            (t.batch_size, cfg.data.seq_len + 1), jnp.int32, sharding=tokens_sharding
        )
    }
    return step, (with_shardings(abstract, where.state), batch)
