"""Federated pre-training: Photon vs DiLoCo vs centralized, DEPT's embeddings, Photon over Flower.

``photon``: silos from the embedded corpora (the CPython standard library's top-level modules
grouped alphabetically into ``python_silos`` heterogeneous silos, plus the prose corpus as one
more silo), one shared BPE tokenizer, a small Llama-style decoder. Three runs see the same
tokens in the same order: Photon's recipe (small client batch, high inner AdamW learning rate,
FedAvg = outer ``sgd(1.0)``), DiLoCo's (inner AdamW 4e-4, wd 0.1, betas 0.9/0.95; outer
Nesterov SGD 0.7 / 0.9) and centralized AdamW on the union of the client batches, one step per
local step (the same total tokens). Validation perplexity (held-out files of every silo) after
every round, against steps and against bytes communicated (DDP: full gradients every step).

    jaxeff run photon --preset cpu     # ~12 min on 2 heavily shared cores
    jaxeff run photon --preset smoke   # seconds; what the tests run

Goals: Photon within 5% of the centralized perplexity with ``comm_reduction_vs_ddp`` >= 64
(``= H * P_full / P_comm = H`` for full-model averaging), and Photon reaching the target
(1.05 x the centralized final perplexity) in at most 0.7x DiLoCo's rounds.
Measured here (cpu preset: 9 silos, 0.56M-parameter decoder, H = 64, 8 rounds, 590k tokens
per method): perplexity Photon 141.7, DiLoCo 148.1, centralized 61.7 (init 1045);
``comm_reduction_vs_ddp`` 64 (met). Missed: Photon is 2.3x the centralized perplexity and
neither federated run reaches the target in 8 rounds (client drift over 9 very different silos
with only 8 synchronisations; the paper trains thousands of rounds). Photon stays ahead of
DiLoCo from round 1 and reaches DiLoCo's final perplexity in 7 of 8 rounds. Photon's inner
learning rate 1e-3 is the best of {1e-3, 3e-3, 1e-2} (141.7, 155.1, 205.5).

JSON: ``ppl_photon``, ``ppl_diloco``, ``ppl_central``, ``comm_reduction_vs_ddp``,
``rounds_to_target_photon``, ``rounds_to_target_diloco`` (null: not reached), plus
``target_ppl``, ``local_steps``, ``rounds``, ``clients``, ``params``, ``bytes_per_round`` and
``ppl_by_round``.

``dept``: GLOB vs TRIM vs SPEC (`jaxeff.parallel.dept`) on multilingual silos: numbers written
out in several languages (num2words), English prose and Python code. GLOB and TRIM share one
BPE vocabulary; SPEC trains one BPE tokenizer per silo. Per-token perplexities of different
tokenizers are not comparable, so bits per byte (``bpb``) is reported beside them. Then a
held-out language joins: GLOB with the global embedding, SPEC with its own tokenizer and a fresh
embedding on the trained body, each adapting for a few local steps.

    jaxeff run dept --preset cpu       # ~6 min on 2 shared cores

Measured here (cpu preset, 6 silos: en, de, fr, ru numbers, prose, code; ~6 min on the loaded
2 cores): bits/byte GLOB 2.43, TRIM 1.83, SPEC 1.93; embedding parameters per client 131k,
31k, 49k; SPEC sends 0.76x GLOB's bytes per round (the body dominates this tiny model); the
held-out language (es) reaches 1.23 bits/byte from SPEC's body with a fresh embedding against
2.91 from GLOB's global model after 32 steps.

JSON: ``ppl`` and ``bpb`` per variant (mean over silos; detail in ``ppl_by_silo``),
``embedding_params`` per variant (mean rows x dim a client holds), ``bytes_per_round`` per
variant, ``comm_ratio_spec_vs_glob`` (SPEC's bytes per round / GLOB's), ``comm_reduction_vs_ddp``
per variant (``H * P_full / P_comm``), ``adapt_bpb`` (held-out language: ``glob``, ``spec``).

``photon-flower``: the ``photon`` smoke setup over Flower (`jaxeff.parallel.flower`): a server
process and one process per client (3; 2 in the ``smoke`` preset, which keeps one Python silo)
on localhost over gRPC, global model checkpointed with orbax each round; the same Photon rounds
are then run on the mesh with the same seed and the metrics printed side by side. JSON:
``ppl_flower``, ``ppl_mesh``, ``max_abs_diff_vs_mesh``, ``rounds``, ``clients``, ``events`` (the
server's per-round log).

    jaxeff run photon-flower --preset smoke

References: Sani, Iacob et al., Photon: Federated LLM Pre-Training, MLSys 2025
(https://arxiv.org/abs/2411.02908); Douillard et al., DiLoCo, 2023
(https://arxiv.org/abs/2311.08105); Iacob et al., DEPT, ICLR 2025
(https://arxiv.org/abs/2410.05258).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

from jaxeff.experiment import Experiment
from jaxeff.nn.config import TransformerConfig
from jaxeff.plots import save_figure
from jaxeff.train.recipe import OptimConfig

# the decoder of every run (vocab_size and max_seq_len come from the data)
MODEL = TransformerConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=384)


@dataclasses.dataclass(frozen=True)
class PhotonConfig:
    seed: int = 0
    python_silos: int = 8
    include_prose: bool = True
    bytes_per_silo: int = 120_000
    vocab_size: int = 1024
    seq_len: int = 64
    val_fraction: float = 0.1
    model: TransformerConfig = MODEL
    local_steps: int = 64
    rounds: int = 8
    client_batch: int = 2
    warmup_frac: float = 0.05
    photon_lr: float = 1e-3
    diloco_lr: float = 4e-4
    central_lr: float = 3e-3
    weight_decay: float = 0.1
    eval_batches: int = 16
    eval_batch: int = 16
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class FlowerConfig:
    photon: PhotonConfig = PhotonConfig()
    round_timeout: float = 120.0
    timeout: float = 600.0


@dataclasses.dataclass(frozen=True)
class DeptConfig:
    seed: int = 0
    languages: tuple[str, ...] = ("en", "de", "fr", "ru")
    heldout_language: str = "es"
    bytes_per_silo: int = 60_000
    glob_vocab: int = 1024
    spec_vocab: int = 384
    seq_len: int = 64
    val_fraction: float = 0.15
    model: TransformerConfig = MODEL
    local_steps: int = 32
    rounds: int = 6
    client_batch: int = 4
    lr: float = 3e-3
    adapt_steps: int = 32
    eval_batches: int = 8
    eval_batch: int = 16
    progress: bool = True


SMOKE_MODEL = TransformerConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=64)


def get_photon_config(preset: str) -> PhotonConfig:
    if preset == "smoke":
        return PhotonConfig(
            python_silos=2,
            bytes_per_silo=20_000,
            vocab_size=300,
            seq_len=16,
            model=SMOKE_MODEL,
            local_steps=4,
            rounds=2,
            client_batch=2,
            eval_batches=2,
            eval_batch=8,
            progress=False,
        )
    if preset == "cpu":
        return PhotonConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def get_flower_config(preset: str) -> FlowerConfig:
    """Both presets are the photon smoke setup (the point is the transport, not the scale);
    ``smoke`` with one Python silo: 2 clients, one process fewer to start."""
    if preset == "smoke":
        return FlowerConfig(photon=dataclasses.replace(get_photon_config("smoke"), python_silos=1))
    if preset == "cpu":
        return FlowerConfig(photon=get_photon_config("smoke"))
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def get_dept_config(preset: str) -> DeptConfig:
    if preset == "smoke":
        return DeptConfig(
            languages=("en", "de"),
            bytes_per_silo=25_000,
            glob_vocab=320,
            spec_vocab=280,
            seq_len=16,
            model=SMOKE_MODEL,
            local_steps=3,
            # one round: bytes and embedding sizes are per round, and a second round would
            # trace the round function again (its inputs then live on the mesh)
            rounds=1,
            client_batch=2,
            adapt_steps=2,
            eval_batches=2,
            eval_batch=4,
            progress=False,
        )
    if preset == "cpu":
        return DeptConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


# ---------------------------------------------------------------------------------------------
# Data: silos, tokenizers, packed windows.


def python_silo_groups(n: int) -> list[list[str]]:
    """The stdlib's top-level modules in ``n`` contiguous alphabetical groups."""
    from jaxeff.data import corpora

    names = corpora.list_silos("python")
    if not 1 <= n <= len(names):
        raise ValueError(f"python_silos must be in [1, {len(names)}], got {n!r}")
    size = math.ceil(len(names) / n)
    return [names[i * size : (i + 1) * size] for i in range(n) if names[i * size : (i + 1) * size]]


def capped_documents(corpus: str, max_bytes: int, silos=None) -> list:
    """Whole documents of ``silos`` of a corpus, taken round-robin over the silos (first
    document of each, then the second...) and skipping those that do not fit, until
    ``max_bytes``: unlike ``load_documents``, a run of large documents does not end the
    selection."""
    from jaxeff.data import corpora

    by_silo: dict[str, list] = {}
    for doc in corpora.load_documents(corpus, silos):
        by_silo.setdefault(doc.silo, []).append(doc)
    order = [
        docs[k]
        for k in range(max(map(len, by_silo.values())))
        for docs in by_silo.values()
        if k < len(docs)
    ]
    out, used = [], 0
    for doc in order:
        size = len(doc.text.encode("utf-8"))
        if used + size <= max_bytes:
            out.append(doc)
            used += size
    return sorted(out, key=lambda d: d.id)


def _split(docs, val_fraction, seed):
    from jaxeff.data import corpora

    train, val = corpora.split_documents(docs, val_fraction, seed)
    if not train or not val:
        raise ValueError("a silo needs at least 2 documents to split; raise bytes_per_silo")
    return train, val


def _tokenizer(train_docs, vocab_size):
    from jaxeff.data import packing, tokenize

    return tokenize.get_tokenizer(
        packing.docs_key(train_docs), lambda: (d.text for d in train_docs), vocab_size
    )


def _pack(tokenizer, docs, seq_len):
    from jaxeff.data import packing, tokenize

    eos = tokenizer.token_to_id(tokenize.EOS_TOKEN)
    return packing.pack_sequences(tokenize.encode_documents(tokenizer, docs), seq_len, eos)


def photon_silos(cfg: PhotonConfig) -> dict:
    """``{"names", "train": [C] windows, "val": windows, "vocab_size"}``."""

    silos = []
    for k, group in enumerate(python_silo_groups(cfg.python_silos)):
        docs = capped_documents("python", cfg.bytes_per_silo, group)
        silos.append((f"python/{group[0]}..{group[-1]}" if len(group) > 1 else group[0], docs))
        del k
    if cfg.include_prose:
        silos.append(("prose", capped_documents("prose", cfg.bytes_per_silo)))
    splits = [_split(docs, cfg.val_fraction, cfg.seed) for _, docs in silos]
    tokenizer = _tokenizer([d for tr, _ in splits for d in tr], cfg.vocab_size)
    return {
        "names": [n for n, _ in silos],
        "train": [_pack(tokenizer, tr, cfg.seq_len) for tr, _ in splits],
        "val": _pack(tokenizer, [d for _, va in splits for d in va], cfg.seq_len),
        "vocab_size": tokenizer.get_vocab_size(),
    }


def client_batch_fn(train: list, local_steps: int, batch: int, seed: int, extra=None):
    """``(client, round) -> {"tokens": [H, B, S+1]}`` drawn with a NumPy RNG seeded by
    ``(seed, client, round)``: the same in every process."""
    import numpy as np

    def fn(c: int, r: int):
        rng = np.random.default_rng([seed, c, r])
        idx = rng.integers(0, len(train[c]), size=(local_steps, batch))
        out = {"tokens": train[c][idx]}
        if extra is not None:
            out.update(
                {k: np.broadcast_to(v[c], (local_steps,) + v[c].shape) for k, v in extra.items()}
            )
        return out

    return fn


def _model(model: TransformerConfig, vocab: int, seq_len: int, seed: int, vocab_knob: str):
    from flax import nnx

    from jaxeff.nn.transformer import Transformer
    from jaxeff.train.recipe import model_for_data

    tcfg = model_for_data(model, vocab, seq_len, vocab_knob=vocab_knob)
    graphdef, params = nnx.split(Transformer(tcfg, rngs=nnx.Rngs(params=seed)))
    return tcfg, graphdef, params


def _lm_loss(graphdef):
    import jax.numpy as jnp

    from jaxeff.train.losses import causal_lm_loss

    def loss(params, batch):
        return jnp.mean(causal_lm_loss(graphdef, params, batch, None).per_sample)

    return loss


@functools.cache
def _nll_fn(graphdef):
    """One jitted ``(params, tokens [B, S+1], row_weights [B], vocab_mask [V]) -> summed NLL``
    per model structure, shared by every evaluation of a run (one compile per shape)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    @jax.jit
    def nll(params, tokens, rows, vocab_mask):
        logits = jnp.where(vocab_mask, nnx.merge(graphdef, params)(tokens[:, :-1])[0], -1e9)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
        return jnp.sum(per_token * rows[:, None])

    return nll


def make_eval_fn(graphdef, val, batch: int, max_batches: int, vocab_mask=None):
    """``params -> {"loss", "ppl", "nll_sum", "token_count"}`` over the first
    ``max_batches * batch`` validation windows (a short last batch is padded and masked)."""
    import numpy as np

    n = min(len(val), max_batches * batch)
    pad = -n % batch
    windows = np.concatenate([val[:n], np.zeros((pad, val.shape[1]), val.dtype)])
    rows = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    nll = _nll_fn(graphdef)

    def fn(params):
        vocab = np.ones(1, bool) if vocab_mask is None else np.asarray(vocab_mask)
        total = sum(
            float(nll(params, windows[i : i + batch], rows[i : i + batch], vocab))
            for i in range(0, len(windows), batch)
        )
        count = n * (val.shape[1] - 1)
        loss = total / count
        return {
            "loss": loss,
            "ppl": math.exp(min(loss, 700.0)),
            "nll_sum": total,
            "token_count": count,
        }

    return fn


def _adamw(lr: float, steps: int, warmup_frac: float, weight_decay: float):
    """The recipe's warmup-cosine AdamW (`jaxeff.train.recipe.OptimConfig`), unclipped."""
    warmup = max(1, int(warmup_frac * steps))
    optim = OptimConfig(
        learning_rate=lr, warmup_steps=warmup, weight_decay=weight_decay, clip_norm=None
    )
    return optim.build(steps)


def photon_task(method: str = "photon", preset: str = "smoke", overrides: dict | None = None):
    """The `FederatedTask` of a ``photon`` run (``method``: ``photon`` or ``diloco``); the
    factory the Flower processes call with the same arguments."""
    from jaxeff import config as config_lib

    cfg = get_photon_config(preset)
    if overrides:
        cfg = config_lib.from_dict(PhotonConfig, {**config_lib.to_dict(cfg), **overrides})
    return _photon_task(cfg, method, photon_silos(cfg))


def _photon_task(cfg: PhotonConfig, method: str, data: dict):
    from jaxeff.parallel import federated as fed

    tcfg, graphdef, params = _model(
        cfg.model, data["vocab_size"], cfg.seq_len, cfg.seed, "vocab_size"
    )
    total = cfg.rounds * cfg.local_steps
    if method == "photon":
        inner = _adamw(cfg.photon_lr, total, cfg.warmup_frac, cfg.weight_decay)
        outer = fed.outer_optimizer("fedavg")
    elif method == "diloco":
        inner = _adamw(cfg.diloco_lr, total, cfg.warmup_frac, cfg.weight_decay)
        outer = fed.outer_optimizer("diloco")
    else:
        raise ValueError(f"method {method!r} is unknown; allowed: photon, diloco")
    return fed.FederatedTask(
        params=params,
        loss_fn=_lm_loss(graphdef),
        inner_tx=inner,
        outer_tx=outer,
        num_clients=len(data["train"]),
        client_batches=client_batch_fn(data["train"], cfg.local_steps, cfg.client_batch, cfg.seed),
        eval_fn=make_eval_fn(graphdef, data["val"], cfg.eval_batch, cfg.eval_batches),
    )


def rounds_to_target(ppls: list[float], target: float) -> int | None:
    """The first round (1-based) whose perplexity is at most ``target``; None if none."""
    return next((i + 1 for i, p in enumerate(ppls) if p <= target), None)


def _run_federated(task, cfg_rounds: int, name: str, writer, progress: bool):
    from jaxeff.parallel import federated as fed

    ppls, info_bytes = [], []

    def on_round(r, server, info):
        ev = task.eval_fn(server.params)
        ppls.append(ev["ppl"])
        info_bytes.append(info["bytes"]["total"])
        writer.write(
            r + 1,
            "val",
            {
                f"{name}/ppl": ev["ppl"],
                f"{name}/loss": ev["loss"],
                f"{name}/train_loss": float(info["loss"].mean()),
                f"{name}/bytes": sum(info_bytes),
            },
        )

    mesh = fed.largest_mesh(task.num_clients)
    server, clients = fed.run_rounds(task, cfg_rounds, mesh, on_round=on_round, progress=progress)
    return ppls, info_bytes, server, clients


def _run_central(cfg: PhotonConfig, task, writer):
    """AdamW on the union of the client batches, one step per local step (equal tokens)."""
    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from jaxeff.parallel import federated as fed

    tx = _adamw(cfg.central_lr, cfg.rounds * cfg.local_steps, cfg.warmup_frac, cfg.weight_decay)
    params, opt = task.params, tx.init(task.params)
    run = jax.jit(lambda p, s, b: fed.local_train(task.loss_fn, tx, p, s, b))
    ppls = []
    for r in tqdm(range(cfg.rounds), desc="central", disable=not cfg.progress):
        b = fed.round_batches(task, r)["tokens"]  # [C, H, B, S+1] -> [H, C*B, S+1]
        b = np.swapaxes(b, 0, 1).reshape(b.shape[1], -1, b.shape[-1])
        params, opt, losses = run(params, opt, {"tokens": b})
        ev = task.eval_fn(params)
        ppls.append(ev["ppl"])
        writer.write(
            r + 1,
            "val",
            {
                "central/ppl": ev["ppl"],
                "central/loss": ev["loss"],
                "central/train_loss": float(np.mean(losses)),
            },
        )
    return ppls


def plot_ppl(curves: dict, path: str, xlabel: str, title: str, logx: bool = False) -> None:
    from jaxeff.plots import subplots

    fig, ax = subplots(figsize=(6, 4))
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, "o-", label=name)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def run_photon(cfg: PhotonConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    from jaxeff.parallel import federated as fed
    from jaxeff.train.metrics import MetricsWriter

    del resume
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-photon-")
    os.makedirs(workdir, exist_ok=True)
    data = photon_silos(cfg)
    tasks = {m: _photon_task(cfg, m, data) for m in ("photon", "diloco")}
    h, c = cfg.local_steps, len(data["train"])
    with MetricsWriter(workdir) as writer:
        init = tasks["photon"].eval_fn(tasks["photon"].params)
        writer.write(0, "val", {f"{m}/ppl": init["ppl"] for m in ("photon", "diloco", "central")})
        runs = {m: _run_federated(t, cfg.rounds, m, writer, cfg.progress) for m, t in tasks.items()}
        central = _run_central(cfg, tasks["photon"], writer)
    params = tasks["photon"].params
    p_full = fed.num_elements(params)
    per_round = runs["photon"][1][0]
    ddp_per_round = fed.ddp_bytes(params, h, c)
    target = 1.05 * central[-1]
    steps = [(r + 1) * h for r in range(cfg.rounds)]
    curves = {m: (steps, runs[m][0]) for m in ("photon", "diloco")}
    curves["central"] = (steps, central)
    plot_ppl(
        curves, os.path.join(workdir, "ppl_vs_steps.png"), "local steps", "photon: ppl vs steps"
    )
    by_bytes = {
        m: ([(r + 1) * per_round for r in range(cfg.rounds)], runs[m][0])
        for m in curves
        if m != "central"
    }
    by_bytes["central (DDP)"] = ([(r + 1) * ddp_per_round for r in range(cfg.rounds)], central)
    plot_ppl(
        by_bytes,
        os.path.join(workdir, "ppl_vs_bytes.png"),
        "bytes communicated",
        "photon: ppl vs bytes",
        logx=True,
    )
    out = {
        "ppl_photon": runs["photon"][0][-1],
        "ppl_diloco": runs["diloco"][0][-1],
        "ppl_central": central[-1],
        "comm_reduction_vs_ddp": ddp_per_round / per_round,
        "rounds_to_target_photon": rounds_to_target(runs["photon"][0], target),
        "rounds_to_target_diloco": rounds_to_target(runs["diloco"][0], target),
        "target_ppl": target,
        "init_ppl": init["ppl"],
        "photon_vs_central": runs["photon"][0][-1] / central[-1],
        "local_steps": h,
        "rounds": cfg.rounds,
        "clients": c,
        "silos": data["names"],
        "params": p_full,
        "bytes_per_round": per_round,
        "ddp_bytes_per_round": ddp_per_round,
        "tokens": cfg.rounds * h * c * cfg.client_batch * cfg.seq_len,
        "ppl_by_round": {
            "photon": runs["photon"][0],
            "diloco": runs["diloco"][0],
            "central": central,
        },
    }
    _print_table(
        ["method", "final ppl", "rounds to target", "bytes / round"],
        [
            [
                "photon",
                f"{out['ppl_photon']:.2f}",
                str(out["rounds_to_target_photon"]),
                str(per_round),
            ],
            [
                "diloco",
                f"{out['ppl_diloco']:.2f}",
                str(out["rounds_to_target_diloco"]),
                str(per_round),
            ],
            ["central", f"{out['ppl_central']:.2f}", "-", f"{ddp_per_round} (DDP)"],
        ],
    )
    return out


def _print_table(header, rows) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))


# ---------------------------------------------------------------------------------------------
# photon-flower


def run_photon_flower(cfg: FlowerConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    import jax
    import numpy as np

    from jaxeff import config as config_lib
    from jaxeff.parallel import federated as fed
    from jaxeff.parallel import flower
    from jaxeff.train.checkpoint import Checkpointer

    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-photon-flower-")
    os.makedirs(workdir, exist_ok=True)
    p = cfg.photon
    spec = {
        "factory": "jaxeff.experiments.federated:photon_task",
        "kwargs": {"method": "photon", "preset": "smoke", "overrides": config_lib.to_dict(p)},
    }
    task = photon_task("photon", "smoke", config_lib.to_dict(p))
    fl_dir = os.path.join(workdir, "flower")
    if not resume and os.path.exists(os.path.join(fl_dir, flower.EVENTS)):
        raise ValueError(f"{fl_dir} holds a previous run; use --resume or a new --out")
    events = flower.launch(
        spec,
        fl_dir,
        task.num_clients,
        p.rounds,
        min_fit_clients=task.num_clients,
        round_timeout=cfg.round_timeout,
        timeout=cfg.timeout,
    )
    server0, _ = fed.init(task.params, task.inner_tx, task.outer_tx, 1)
    ckpt = Checkpointer(os.path.join(fl_dir, "checkpoints"), async_save=False)
    try:
        fl_server, _, _ = ckpt.restore(server0)
    finally:
        ckpt.close()
    ppl_mesh = []
    server, _ = fed.run_rounds(
        task,
        p.rounds,
        fed.largest_mesh(task.num_clients),
        on_round=lambda r, s, i: ppl_mesh.append(task.eval_fn(s.params)["ppl"]),
    )
    diff = max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(fl_server.params), jax.tree.leaves(server.params), strict=True
        )
    )
    ok = [e for e in events if e.get("status") == "ok"]
    out = {
        "ppl_flower": ok[-1]["ppl"] if ok else None,
        "ppl_mesh": ppl_mesh[-1],
        "max_abs_diff_vs_mesh": diff,
        "rounds": p.rounds,
        "clients": task.num_clients,
        "ppl_by_round": {"flower": [e.get("ppl") for e in ok], "mesh": ppl_mesh},
        "events": events,
    }
    _print_table(
        ["round", "ppl flower", "ppl mesh"],
        [
            [str(i + 1), f"{a:.4f}", f"{b:.4f}"]
            for i, (a, b) in enumerate(zip(out["ppl_by_round"]["flower"], ppl_mesh, strict=False))
        ],
    )
    return out


# ---------------------------------------------------------------------------------------------
# dept


def dept_silos(cfg: DeptConfig) -> dict:
    """Silo name -> (train docs, val docs) for each language, prose and Python code, plus the
    held-out language."""
    from jaxeff.data import corpora

    def lang(code):
        silos = [f"{code}/{d}" for d in corpora.NUMBER_DOMAINS]
        return capped_documents("numbers", cfg.bytes_per_silo, silos)

    for code in (*cfg.languages, cfg.heldout_language):
        if code not in corpora.NUMBER_LANGUAGES:
            raise ValueError(
                f"language {code!r} is unknown; allowed: "
                f"{corpora.allowed_values(corpora.NUMBER_LANGUAGES)}"
            )
    raw = {f"numbers/{c}": lang(c) for c in cfg.languages}
    raw["prose"] = capped_documents("prose", cfg.bytes_per_silo)
    raw["python"] = capped_documents("python", cfg.bytes_per_silo)
    silos = {k: _split(v, cfg.val_fraction, cfg.seed) for k, v in raw.items()}
    heldout = _split(lang(cfg.heldout_language), cfg.val_fraction, cfg.seed)
    return {"silos": silos, "heldout": heldout}


def _tokenize_silos(silos: dict, tokenizers: list, seq_len: int):
    trains, vals, val_bytes = [], [], []
    for (tr, va), tok in zip(silos.values(), tokenizers, strict=True):
        trains.append(_pack(tok, tr, seq_len))
        vals.append(_pack(tok, va, seq_len))
        val_bytes.append(sum(len(d.text.encode()) for d in va))
    return trains, vals, val_bytes


def run_dept(cfg: DeptConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    import jax
    import numpy as np
    import optax

    from jaxeff.parallel import dept as emb
    from jaxeff.parallel import federated as fed
    from jaxeff.train.metrics import MetricsWriter

    del resume
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-dept-")
    os.makedirs(workdir, exist_ok=True)
    d = dept_silos(cfg)
    silos, names = d["silos"], list(d["silos"])
    num = len(names)
    glob_tok = _tokenizer([x for tr, _ in silos.values() for x in tr], cfg.glob_vocab)
    spec_toks = [_tokenizer(tr, cfg.spec_vocab) for tr, _ in silos.values()]
    results = {
        "ppl": {},
        "bpb": {},
        "embedding_params": {},
        "bytes_per_round": {},
        "comm_reduction_vs_ddp": {},
        "ppl_by_silo": {},
    }
    trained = {}
    writer = MetricsWriter(workdir)
    for variant in emb.VARIANTS:
        toks = spec_toks if variant == "spec" else [glob_tok] * num
        trains, vals, val_bytes = _tokenize_silos(silos, toks, cfg.seq_len)
        sizes = [t.get_vocab_size() for t in toks]
        if variant == "spec":
            _, graphdef, params = _model(
                cfg.model, max(sizes), cfg.seq_len, cfg.seed, "glob_vocab / spec_vocab"
            )
            client_params, vmask = emb.spec_client_params(
                params, sizes, jax.random.PRNGKey(cfg.seed + 1)
            )
        else:
            _, graphdef, params = _model(
                cfg.model, sizes[0], cfg.seq_len, cfg.seed, "glob_vocab / spec_vocab"
            )
            client_params = None
            vmask = (
                emb.vocab_masks(
                    [
                        np.concatenate([t.ravel(), v.ravel()])
                        for t, v in zip(trains, vals, strict=True)
                    ],
                    sizes[0],
                )
                if variant == "trim"
                else np.ones((num, sizes[0]), bool)
            )
        masks = emb.aggregation_masks(params, variant, vmask)
        total = cfg.rounds * cfg.local_steps
        task = fed.FederatedTask(
            params=params,
            loss_fn=emb.dept_lm_loss(graphdef),
            inner_tx=_adamw(cfg.lr, total, 0.05, 0.1),
            outer_tx=fed.outer_optimizer("fedavg"),
            num_clients=num,
            client_batches=client_batch_fn(
                trains, cfg.local_steps, cfg.client_batch, cfg.seed, extra={"vocab_mask": vmask}
            ),
            masks=masks,
            client_params=client_params,
        )
        bytes_round = []
        server, clients = fed.run_rounds(
            task,
            cfg.rounds,
            fed.largest_mesh(num),
            on_round=lambda r, s, i, v=variant, br=bytes_round: (
                br.append(i["bytes"]["total"]),
                writer.write(r + 1, "train", {f"{v}/loss": float(i["loss"].mean())}),
            ),
            progress=cfg.progress,
        )
        ppl_s, bpb_s = {}, {}
        for c, name in enumerate(names):
            p_c = jax.tree.map(lambda x, c=c: x[c], clients.params)
            ev = make_eval_fn(graphdef, vals[c], cfg.eval_batch, cfg.eval_batches, vmask[c])(p_c)
            ppl_s[name] = ev["ppl"]
            # bits per byte over the evaluated windows, scaled by their share of the split
            frac = ev["token_count"] / vals[c][:, 1:].size
            bpb_s[name] = ev["nll_sum"] / math.log(2) / (frac * val_bytes[c])
        results["ppl_by_silo"][variant] = ppl_s
        results["ppl"][variant] = float(np.mean(list(ppl_s.values())))
        results["bpb"][variant] = float(np.mean(list(bpb_s.values())))
        rows = vmask.sum(axis=1)
        results["embedding_params"][variant] = emb.embedding_params(
            variant, rows.tolist(), cfg.model.dim, sizes[0] if variant != "spec" else max(sizes)
        )
        results["bytes_per_round"][variant] = bytes_round[0]
        results["comm_reduction_vs_ddp"][variant] = (
            fed.ddp_bytes(params, cfg.local_steps, num) / bytes_round[0]
        )
        writer.write(
            cfg.rounds,
            "val",
            {f"{variant}/ppl": results["ppl"][variant], f"{variant}/bpb": results["bpb"][variant]},
        )
        trained[variant] = (graphdef, server.params, sizes)
    writer.close()
    results["comm_ratio_spec_vs_glob"] = (
        results["bytes_per_round"]["spec"] / results["bytes_per_round"]["glob"]
    )
    results["adapt_bpb"] = _adapt(cfg, d["heldout"], trained, glob_tok, optax)
    results["silos"] = names
    _print_table(
        ["variant", "ppl (own tokens)", "bits/byte", "embedding params", "bytes/round"],
        [
            [
                v,
                f"{results['ppl'][v]:.2f}",
                f"{results['bpb'][v]:.3f}",
                f"{results['embedding_params'][v]:.0f}",
                str(results["bytes_per_round"][v]),
            ]
            for v in emb.VARIANTS
        ],
    )
    print(
        f"held-out {cfg.heldout_language}: bits/byte after {cfg.adapt_steps} steps: "
        f"glob {results['adapt_bpb']['glob']:.3f}, spec {results['adapt_bpb']['spec']:.3f}"
    )
    return results


def _adapt(cfg: DeptConfig, heldout, trained, glob_tok, optax) -> dict:
    """A new silo: GLOB starts from the global model (global embedding); SPEC trains its own
    tokenizer and a fresh embedding on the global body. Both adapt all parameters for
    ``adapt_steps`` local steps; bits per byte on the silo's validation documents."""
    import jax
    import numpy as np

    from jaxeff.parallel import dept as emb
    from jaxeff.parallel import federated as fed

    tr, va = heldout
    val_bytes = sum(len(x.text.encode()) for x in va)
    out = {}
    for variant in ("glob", "spec"):
        graphdef, params, sizes = trained[variant]
        if variant == "glob":
            tok = glob_tok
        else:
            tok = _tokenizer(tr, cfg.spec_vocab)
            fresh = emb.fresh_embedding(jax.random.PRNGKey(cfg.seed + 7), max(sizes), cfg.model.dim)
            params = emb.with_embedding(params, fresh)
        vocab = emb.embedding_of(params).shape[0]
        vm = np.arange(vocab) < tok.get_vocab_size()
        train, val = _pack(tok, tr, cfg.seq_len), _pack(tok, va, cfg.seq_len)
        batches = client_batch_fn(
            [train], cfg.adapt_steps, cfg.client_batch, cfg.seed + 3, extra={"vocab_mask": vm[None]}
        )(0, 0)
        tx = optax.adamw(cfg.lr, b1=0.9, b2=0.95, weight_decay=0.1)
        loss = emb.dept_lm_loss(graphdef)
        params, _, _ = jax.jit(functools.partial(fed.local_train, loss, tx))(
            params, tx.init(params), batches
        )
        ev = make_eval_fn(graphdef, val, cfg.eval_batch, cfg.eval_batches, vm)(params)
        frac = ev["token_count"] / val[:, 1:].size
        out[variant] = ev["nll_sum"] / math.log(2) / (frac * val_bytes)
    return out


EXPERIMENTS = {
    "photon": Experiment(
        get_photon_config,
        run_photon,
        doc=__doc__,
        title="Federated pre-training: Photon vs DiLoCo vs centralized AdamW on the same tokens, "
        "perplexity against steps and bytes.",
    ),
    "dept": Experiment(
        get_dept_config,
        run_dept,
        presets=("smoke", "cpu"),
        doc="DEPT GLOB vs TRIM vs SPEC on multilingual silos: perplexity, embedding params, "
        "bytes per round, adaptation to a held-out language.\n\n" + __doc__,
    ),
    "photon-flower": Experiment(
        get_flower_config,
        run_photon_flower,
        presets=("smoke", "cpu"),
        doc="The photon smoke setup over Flower (a process per client, gRPC on localhost), "
        "compared with the mesh run of the same seed.\n\n" + __doc__,
    ),
}
