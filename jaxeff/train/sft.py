"""Supervised fine-tuning (SFT) of a jaxeff decoder on chat examples: full or LoRA.

An example is a conversation (ChatML, `jaxeff.llm.chat.ChatTemplate`); the model learns only
the assistant turns. With tokens ``t_1..t_n`` and a mask ``m_i`` that is 1 exactly on the
tokens of assistant contents and the ``<|im_end|>`` closing each of them (so the model learns
to stop), the per-example loss is::

    L = sum_i m_i * (-log p(t_i | t_<i)) / sum_i m_i

`encode_chat` finds the mask from the tokenizer's character offsets of the formatted text, so
it is exact whatever the tokenizer merges at turn boundaries.

Packing: `pack` places whole examples into fixed rows of ``seq_len + 1`` tokens (first fit,
longest first), each with its own ``segment_ids`` (1, 2, ...; 0 for padding) and RoPE
``positions`` restarting at 0; attention is causal *within* a segment, so a packed example
sees exactly what it would see alone, and the fixed row shape compiles once.

Methods: ``full`` trains every ``nnx.Param``; ``lora`` wraps the chosen projections with
adapters (`jaxeff.nn.lora`) and trains only those, the base weights passed to the step as a
frozen argument (no gradient, no optimizer state). Any Optax ``GradientTransformation`` may be
given; the default is AdamW with linear warmup and cosine decay after global-norm clipping.
Evaluation: held-out loss per assistant token (`heldout_loss`) and exact match of greedy
generations against the assistant text (`exact_match`).

References:
  Ouyang et al., Training language models to follow instructions with human feedback, 2022
  (SFT on demonstrations). https://arxiv.org/abs/2203.02155
  Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022.
  https://arxiv.org/abs/2106.09685
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxeff.llm.chat import IM_END, ChatTemplate
from jaxeff.nn import lora as lora_lib
from jaxeff.train.loop import objective, progress
from jaxeff.train.losses import LossOutput
from jaxeff.train.state import TrainState, create_train_state

Messages = Sequence[Mapping[str, str]]


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Fine-tuning settings.

    Attributes:
      method: ``lora`` (adapters only) or ``full`` (every parameter).
      lora: adapter rank, scale and target projections (``method="lora"``).
      seq_len: packed row length (model input length; rows hold ``seq_len + 1`` tokens).
      batch_size: rows per step.
      steps: optimizer steps.
      learning_rate: peak learning rate of the default AdamW schedule.
      warmup_steps: linear warmup of the default schedule (then cosine to 10%).
      weight_decay: AdamW's decoupled decay (default schedule).
      clip_norm: global gradient-norm clip (default optimizer).
      pack: pack several examples per row (False: one example per row, padded).
      log_every: steps between train-metric records.
      eval_every: steps between held-out loss evaluations (0: at the end only).
      seed: data order and the step RNG.
      progress: show a tqdm bar.
    """

    method: str = "lora"
    lora: lora_lib.LoRAConfig = lora_lib.LoRAConfig()
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 100
    learning_rate: float = 2e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    pack: bool = True
    log_every: int = 10
    eval_every: int = 0
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        lora_lib.trainable_filter(self.method)  # validates the name
        for name in ("seq_len", "batch_size", "steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"SFTConfig.learning_rate must be > 0, got {self.learning_rate}")


# ---------------------------------------------------------------------------- data


def assistant_spans(messages: Messages, chat: ChatTemplate) -> tuple[str, list[tuple[int, int]]]:
    """The ChatML text of a whole conversation (no generation prompt) and the character spans
    ``[start, end)`` of every assistant content with its ``<|im_end|>``."""
    text = chat.format(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        # the text up to message i ends with "{content}<|im_end|>\n"
        end = len(chat.format(messages[: i + 1], add_generation_prompt=False)) - 1
        start = end - len(IM_END) - len(message["content"])
        spans.append((start, end))
    if not spans:
        raise ValueError("a fine-tuning example needs at least one assistant message")
    return text, spans


def encode_chat(messages: Messages, tokenizer, chat: ChatTemplate) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``[n]`` of the conversation and its loss mask ``[n]`` (1 on assistant
    content tokens and their ``<|im_end|>``, 0 elsewhere)."""
    text, spans = assistant_spans(messages, chat)
    enc = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(enc.ids, np.int32)
    mask = np.zeros(len(ids), np.int32)
    for j, (s, e) in enumerate(enc.offsets):
        if e > s and any(a <= s and e <= b for a, b in spans):
            mask[j] = 1
    return ids, mask


def pack(
    examples: Sequence[tuple[np.ndarray, np.ndarray]],
    seq_len: int,
    *,
    pack_rows: bool = True,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
    """Rows ``[N, seq_len + 1]`` of ``tokens``, ``loss_mask``, ``segment_ids`` (0 = padding)
    and ``positions`` (see the module docstring). Examples longer than a row raise."""
    width = seq_len + 1
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []  # example indices per row
    room: list[int] = []
    for i in order:
        n = len(examples[i][0])
        if n > width:
            raise ValueError(
                f"example {i} has {n} tokens, more than a row of seq_len + 1 = {width}; "
                "raise seq_len or shorten the example"
            )
        slot = next((r for r, left in enumerate(room) if left >= n), None) if pack_rows else None
        if slot is None:
            rows.append([])
            room.append(width)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= n
    out = {
        "tokens": np.full((len(rows), width), pad_id, np.int32),
        "loss_mask": np.zeros((len(rows), width), np.int32),
        "segment_ids": np.zeros((len(rows), width), np.int32),
        "positions": np.zeros((len(rows), width), np.int32),
    }
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(sorted(members), 1):
            ids, mask = examples[i]
            n = len(ids)
            out["tokens"][r, at : at + n] = ids
            out["loss_mask"][r, at : at + n] = mask
            out["segment_ids"][r, at : at + n] = seg
            out["positions"][r, at : at + n] = np.arange(n)
            at += n
    return out


def batches(rows: Mapping[str, np.ndarray], batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches of rows (reshuffled every epoch); the last partial batch of an
    epoch is filled from the next permutation so that every batch has ``batch_size`` rows."""
    n = len(rows["tokens"])
    if n == 0:
        raise ValueError("no training rows")
    rng = np.random.default_rng(seed)
    queue: list[int] = []
    while True:
        while len(queue) < batch_size:
            queue.extend(rng.permutation(n).tolist())
        take, queue = queue[:batch_size], queue[batch_size:]
        yield {k: v[take] for k, v in rows.items()}


# ---------------------------------------------------------------------------- loss and step


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """``[B, 1, S, S]`` True where query ``i`` may attend key ``j``: ``j <= i`` and both in the
    same segment (padding attends to padding, which no loss reads)."""
    s = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((s, s), bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def sft_loss(graphdef, params, batch, rng, frozen=None) -> LossOutput:
    """Masked next-token cross-entropy over packed rows (the train-step contract of
    `jaxeff.train.loop`); ``frozen`` is the rest of the model's state (LoRA's base weights).

    Metrics (sums over the batch): ``nll_sum``, ``token_count`` and ``correct`` (targets that
    are the argmax)."""
    tokens, seg = batch["tokens"], batch["segment_ids"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    seg_in = seg[:, :-1]
    weight = batch["loss_mask"][:, 1:] * (seg[:, 1:] == seg_in) * (seg_in > 0)
    weight = weight.astype(jnp.float32)
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    # causal within segments: the rows' `segment_mask`, without materialising it
    logits, _ = model(
        inputs,
        batch["positions"][:, :-1],
        segment_ids=seg_in,
        train=rng is not None,
        dropout_key=rng,
    )
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    counts = jnp.sum(weight, axis=-1)
    per_sample = jnp.sum(nll * weight, axis=-1) / jnp.maximum(counts, 1.0)
    correct = jnp.sum((jnp.argmax(logits, -1) == targets) * weight)
    metrics = {"nll_sum": jnp.sum(nll * weight), "token_count": jnp.sum(counts), "correct": correct}
    return LossOutput(per_sample, {}, metrics)


def make_sft_step(graphdef, tx: optax.GradientTransformation, frozen=None):
    """A jitted ``step(state, batch) -> (state, metrics)`` training ``state.params`` with
    ``frozen`` (the rest of the model, or None) as a non-differentiated argument."""

    def step(state: TrainState, frozen, batch):
        rng, step_rng = jax.random.split(state.rng)
        loss_fn = functools.partial(sft_loss, frozen=frozen)

        def total(params):
            return objective(loss_fn, graphdef, params, batch, step_rng)

        (loss, (main, _, metrics)), grads = jax.value_and_grad(total, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = {"loss": main, "grad_norm": optax.tree.norm(grads), **metrics}
        return TrainState(state.step + 1, params, opt_state, rng), out

    jitted = jax.jit(step, donate_argnums=(0,))
    return lambda state, batch: jitted(state, frozen, batch)


def default_optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
    """AdamW, warmup then cosine decay to 10% of the peak, after global-norm clipping."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, max(warmup, 1), max(cfg.steps, warmup + 1),
        end_value=cfg.learning_rate * 0.1,
    )  # fmt: skip
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )


# ---------------------------------------------------------------------------- evaluation


def encode_all(conversations: Sequence[Messages], tokenizer, chat: ChatTemplate):
    return [encode_chat(m, tokenizer, chat) for m in conversations]


@functools.lru_cache(maxsize=8)
def _eval_fn(graphdef):
    return jax.jit(lambda state, batch: sft_loss(graphdef, state, batch, None).metrics)


def heldout_loss(
    model: nnx.Module,
    conversations: Sequence[Messages],
    tokenizer,
    chat: ChatTemplate,
    *,
    seq_len: int = 256,
    batch_size: int = 4,
) -> dict[str, float]:
    """Mean NLL per assistant token (``loss``), its ``ppl`` and ``token_accuracy`` (share of
    assistant tokens that are the argmax) on held-out conversations."""
    rows = pack(encode_all(conversations, tokenizer, chat), seq_len)
    graphdef, state = nnx.split(model)
    step = _eval_fn(graphdef)
    n = len(rows["tokens"])
    totals = {"nll_sum": 0.0, "token_count": 0.0, "correct": 0.0}
    for start in range(0, n, batch_size):
        take = np.arange(start, start + batch_size) % n  # fixed shape: wrap, then drop repeats
        batch = {k: v[take] for k, v in rows.items()}
        keep = (np.arange(start, start + batch_size) < n)[:, None]
        batch["loss_mask"] = batch["loss_mask"] * keep
        for k, v in step(state, batch).items():
            totals[k] += float(v)
    count = max(totals["token_count"], 1.0)
    loss = totals["nll_sum"] / count
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "token_accuracy": totals["correct"] / count,
    }


def generate_replies(
    model: nnx.Module,
    tokenizer,
    chat: ChatTemplate,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    bucket: int = 32,
    show_progress: bool = False,
) -> list[str]:
    """Greedy assistant replies to conversations (one Generator compile per shape bucket)."""
    from jaxeff.infer.generate import Generator

    gen = Generator(model, bucket=bucket)
    ids = [tokenizer.encode(chat.format(m), add_special_tokens=False).ids for m in prompts]
    replies: list[str] = []
    bar = progress(len(ids), desc="generate", enabled=show_progress)
    try:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            outs = gen.generate(chunk, max_new_tokens, stop_ids=chat.stop_ids)
            replies += [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
            bar.update(len(chunk))
    finally:
        bar.close()
    return replies


def exact_match(
    model: nnx.Module,
    tokenizer,
    chat: ChatTemplate,
    conversations: Sequence[Messages],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> float:
    """Share of conversations whose greedy reply to all but the last (assistant) message
    equals that message, after stripping surrounding whitespace."""
    for i, conv in enumerate(conversations):
        if not conv or conv[-1].get("role") != "assistant":
            raise ValueError(f"conversation {i} must end with an assistant message")
    replies = generate_replies(
        model,
        tokenizer,
        chat,
        [list(c[:-1]) for c in conversations],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    hits = [
        r.strip() == c[-1]["content"].strip() for r, c in zip(replies, conversations, strict=True)
    ]
    return sum(hits) / len(hits)


# ---------------------------------------------------------------------------- training


def finetune(
    model: nnx.Module,
    conversations: Sequence[Messages],
    tokenizer,
    chat: ChatTemplate,
    cfg: SFTConfig,
    *,
    tx: optax.GradientTransformation | None = None,
    eval_conversations: Sequence[Messages] | None = None,
    workdir: str | None = None,
) -> tuple[nnx.Module, list[dict]]:
    """Fine-tunes ``model`` in place on ``conversations`` and returns it with the metric
    records (``step``, ``split`` ``train``/``val``, metrics).

    With ``method="lora"`` adapters are added first (unless the model already has them); merge
    them with `jaxeff.nn.lora.merge_lora` or save them alone with `jaxeff.nn.lora.save_adapter`.
    With ``workdir``, records also go to ``metrics.jsonl`` and TensorBoard there.
    """
    from jaxeff.train.metrics import MetricsWriter

    if not conversations:
        raise ValueError("finetune needs at least one training conversation")
    if cfg.method == "lora" and lora_lib.num_lora_params(model) == 0:
        lora_lib.apply_lora(model, cfg.lora)
    rows = pack(
        encode_all(conversations, tokenizer, chat),
        cfg.seq_len,
        pack_rows=cfg.pack,
        pad_id=chat.pad_id or 0,
    )
    graphdef, trainable, frozen = lora_lib.split_trainable(model, cfg.method)
    tx = tx or default_optimizer(cfg)
    # the step donates its state: train a copy, so the model's arrays stay valid meanwhile
    state = create_train_state(jax.tree.map(jnp.copy, trainable), tx, cfg.seed)
    step = make_sft_step(graphdef, tx, frozen)

    def evaluate(params) -> dict:
        probe = nnx.merge(graphdef, params, frozen)
        return heldout_loss(
            probe,
            eval_conversations,
            tokenizer,
            chat,
            seq_len=cfg.seq_len,
            batch_size=cfg.batch_size,
        )

    records: list[dict] = []
    # process 0 writes the run's metrics and TensorBoard (the others only keep `records`)
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0) if workdir else None

    def record(step_: int, split: str, values: Mapping) -> None:
        row = {"step": step_, "split": split, **{k: float(v) for k, v in values.items()}}
        records.append(row)
        if writer is not None:
            writer.write(step_, split, {k: v for k, v in row.items() if k not in ("step", "split")})

    data = batches(rows, cfg.batch_size, cfg.seed)
    bar = progress(cfg.steps, desc=f"sft ({cfg.method})", enabled=cfg.progress)
    sums: dict[str, float] = {}
    try:
        if eval_conversations:
            record(0, "val", evaluate(state.params))
        for i in range(1, cfg.steps + 1):
            state, metrics = step(state, next(data))
            for k, v in jax.device_get(metrics).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if i % cfg.log_every == 0 or i == cfg.steps:
                count = max(sums.get("token_count", 0.0), 1.0)
                record(
                    i,
                    "train",
                    {
                        "loss": sums["nll_sum"] / count,
                        "token_accuracy": sums["correct"] / count,
                        "grad_norm": float(metrics["grad_norm"]),
                    },
                )
                bar.set_postfix(loss=f"{records[-1]['loss']:.3f}")
                sums = {}
            last = i == cfg.steps
            if eval_conversations and ((cfg.eval_every and i % cfg.eval_every == 0) or last):
                record(i, "val", evaluate(state.params))
            bar.update(1)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    nnx.update(model, state.params)
    return model, records


def save_run_files(model: nnx.Module, directory: str, cfg: SFTConfig, tokenizer=None, chat=None):
    """Writes what a fine-tuning run leaves: the adapter alone (LoRA, orbax) under
    ``adapter/`` and the merged model as an HF Llama checkpoint under ``hf/``."""
    from jaxeff.llm.hf import save_llama

    if cfg.method == "lora":
        lora_lib.save_adapter(os.path.join(directory, "adapter"), model, cfg.lora)
    save_llama(model, os.path.join(directory, "hf"), tokenizer=tokenizer, chat=chat)


__all__ = [
    "SFTConfig",
    "assistant_spans",
    "batches",
    "default_optimizer",
    "encode_chat",
    "exact_match",
    "finetune",
    "generate_replies",
    "heldout_loss",
    "make_sft_step",
    "pack",
    "save_run_files",
    "segment_mask",
    "sft_loss",
]
