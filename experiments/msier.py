"""MSIER: random vs unsupervised (CLIP similarity) vs supervised (LM-scored, InfoNCE bi-encoder)
selection of in-context examples; ICL accuracy on held-out queries.

``msier``: the task is visual question answering on jaxeff's rendered digit sprites
(`jaxeff.nn.clip.make_pairs`: digit, colour, size, position, background). The "multimodal LLM"
is SmolLM2-135M-Instruct reading a TEXT rendering of each picture that leaves out the attribute
asked about (``data.attribute``, default the size), e.g. ``Picture: red seven, top left,
striped background.``; the question asks for that attribute and the answer is the option (its
class names, "small" / "large") with the highest log-probability after ``Answer:`` (one forward
per prompt, no generation). The LM cannot see the answer, so it must take it from the
demonstrations: how well the retrieved examples match the query is what the accuracy measures.
The image and text features are those of `jaxeff.nn.clip`'s small CLIP, pre-trained here on the
same generator (600 steps, as the ``zscl`` cpu preset).

Why the size and a pool of 120 examples: the retriever can only find what the CLIP image
features encode. After 600-800 pre-training steps they encode colour, size and background (a
linear probe on 1000 images: 1.00 / 0.975 / 1.00) but not the digit or its position (0.125 /
0.26, chance 0.1 / 0.25), so a digit question defeats every retriever alike. With a large pool
the nearest neighbours share ALL encoded attributes (the 3 nearest of 1000 share the size 97.5%
of the time), so similarity is already optimal; with 120 examples (a few labelled examples, the
usual ICL setting) they trade attributes against each other, and the retriever has to learn
which one the LM needs.

Pipeline (`jaxeff.retrieval.msier`): for each training query, the 50 pool examples most similar
by CLIP image cosine are candidates; SmolLM2 scores each by the NLL of the query's gold answer
with that one example as the demonstration (teacher forcing, batched); the 5 best are
positives and the 5 worst hard negatives; a bi-encoder (query: image features; candidate: mean
of image and text features; residual MLP towers that start AT the CLIP similarity) is trained
with InfoNCE. On the test queries ``k`` demonstrations are picked at random, by CLIP image
similarity (unsupervised) and by the trained retriever (supervised); the text ablation trains
the same retriever on candidate image features alone.

    jaxeff run msier --preset cpu     # ~20 min on 2 cores shared with 5 jobs (13 of them
                                      # SmolLM2 scoring, cached for reruns)
    jaxeff run msier --preset smoke   # what the tests run

Expected (the paper's claim, a goal rather than a test): supervised > unsupervised > random,
and the retriever with candidate text beats the image-only one. Measured with the ``cpu``
preset (size questions, 3 shots, 80 test queries):

    selection                 ICL acc  same answer
    zero-shot                   0.525            -
    random                      0.450        0.500
    unsupervised                0.900        0.871
    supervised_image_only       0.850        0.879
    supervised                  0.887        0.887

Text helps (0.887 vs 0.850) but supervised misses unsupervised by one query of 80, though it
retrieves slightly more same-size demonstrations; the LM's 5 best candidates share the query's
size 89% of the time, its 5 worst 16%; with only 32 scored training queries the retriever
learns little beyond the CLIP similarity (README, ``msier``).

JSON: ``acc_random``, ``acc_unsupervised``, ``acc_supervised`` (ICL accuracy on the test
queries), ``acc_supervised_image_only`` (the text ablation), ``acc_zero_shot`` (no
demonstrations), ``same_answer`` (per method, the fraction of retrieved demonstrations whose
answer equals the query's), ``positives_same_answer`` / ``negatives_same_answer`` (what the LM
rewards), ``retriever_loss_before`` / ``_after`` (InfoNCE on the training queries),
``supervised_beats_unsupervised``, ``text_helps``; ``chance`` is one over the number of options.

References: Luo et al., How Does the Textual Information Affect the Retrieval of Multimodal
In-Context Learning?, EMNLP 2024 (https://arxiv.org/abs/2404.12866); Rubin et al., EPR, NAACL
2022; Allal et al., SmolLM2, 2025.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from jaxeff.experiment import Experiment
from jaxeff.plots import save_figure

ATTRIBUTES = ("digit", "color", "size", "position", "background")
NOUNS = {
    "digit": "digit",
    "color": "colour",
    "size": "size",
    "position": "position",
    "background": "background",
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    attribute: str = "size"  # asked about; left out of the LM's view of the picture
    n_pool: int = 120
    n_train: int = 32
    n_test: int = 80
    seed: int = 0
    image_size: int = 24


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """`jaxeff.nn.clip.pretrained_clip` arguments (warmup must stay below steps)."""

    steps: int = 600
    batch: int = 64
    pool: int = 3000
    warmup: int = 100
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    candidates: int = 50
    n_pos: int = 5
    n_neg: int = 5
    batch_size: int = 32


@dataclasses.dataclass(frozen=True)
class RetrieverTrainConfig:
    steps: int = 300
    batch: int = 16
    learning_rate: float = 1e-3
    temperature: float = 0.05
    hidden: int = 128
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    shots: int = 3
    batch_size: int = 16
    text_ablation: bool = True
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class MsierConfig:
    data: DataConfig = DataConfig()
    clip: ClipConfig = ClipConfig()
    scoring: ScoringConfig = ScoringConfig()
    retriever: RetrieverTrainConfig = RetrieverTrainConfig()
    eval: EvalConfig = EvalConfig()
    progress: bool = True


def get_config(preset: str) -> MsierConfig:
    if preset == "smoke":
        return MsierConfig(
            data=DataConfig(n_pool=60, n_train=6, n_test=4),
            # a few steps: the tests check the pipeline and the LM's scores, not what CLIP
            # learned (that is tests/nn/test_clip.py)
            clip=ClipConfig(steps=10, batch=32, pool=256, warmup=2),
            scoring=ScoringConfig(candidates=12, n_pos=3, n_neg=3, batch_size=36),
            retriever=RetrieverTrainConfig(steps=20, batch=4, hidden=32),
            eval=EvalConfig(shots=2, batch_size=4, text_ablation=False),
            progress=False,
        )
    if preset == "cpu":
        return MsierConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def check_config(cfg: MsierConfig) -> None:
    d, s, e = cfg.data, cfg.scoring, cfg.eval
    if d.attribute not in ATTRIBUTES:
        raise ValueError(f"data.attribute: {d.attribute!r} is not one of {list(ATTRIBUTES)}")
    if min(d.n_pool, d.n_train, d.n_test) < 1:
        raise ValueError("data.n_pool, data.n_train and data.n_test must be >= 1")
    if not 1 <= s.candidates <= d.n_pool:
        raise ValueError(f"scoring.candidates must be in [1, data.n_pool={d.n_pool}]")
    if s.n_pos + s.n_neg > s.candidates:
        raise ValueError("scoring.n_pos + scoring.n_neg must be at most scoring.candidates")
    if not 1 <= e.shots <= d.n_pool:
        raise ValueError(f"eval.shots must be in [1, data.n_pool={d.n_pool}]")


# --- the task -----------------------------------------------------------------------------------


def picture_text(attrs: dict, hidden: str) -> str:
    """The LM's view of a picture: every attribute but ``hidden``, e.g. "Picture: small red
    digit, top left, striped background." (with the digit: "small red seven, ...")."""
    from jaxeff.data import video

    noun = "digit" if hidden == "digit" else video.DIGIT_WORDS[attrs["digit"]]
    words = [w for k, w in (("size", attrs["size"]), ("color", attrs["color"])) if k != hidden]
    parts = [" ".join([*words, noun])]
    if hidden != "position":
        parts.append(attrs["position"])
    if hidden != "background":
        parts.append(f"{video.BACKGROUND_WORDS[video.BACKGROUNDS.index(attrs['background'])]}")
        parts[-1] += " background"
    return "Picture: " + ", ".join(parts) + "."


def answer_text(attrs: dict, attribute: str) -> str:
    from jaxeff.nn import clip

    return clip.CLASS_NAMES[attribute][clip.class_label(attrs, attribute)]


def instruction(attribute: str) -> str:
    noun = NOUNS[attribute]
    return f"Each picture is described without its {noun}. Answer with the {noun}."


# --- pieces -----------------------------------------------------------------------------------


def make_features(cfg: MsierConfig):
    """CLIP image features of the pool and queries and text features of the pool's captions
    (all attributes: the text a retrieved example carries), with the attribute dicts."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxeff.data import video
    from jaxeff.nn import clip

    d = cfg.data
    c = cfg.clip
    model, tok = clip.pretrained_clip(
        steps=c.steps,
        seed=c.seed,
        progress=cfg.progress,
        batch=c.batch,
        pool=c.pool,
        warmup=c.warmup,
    )
    enc_img = nnx.jit(lambda m, x: m.encode_image(x))
    enc_txt = nnx.jit(lambda m, x: m.encode_text(x))

    def embed(fn, xs):
        return np.concatenate(
            [np.asarray(fn(model, jnp.asarray(xs[i : i + 256]))) for i in range(0, len(xs), 256)]
        )

    out = {}
    # Distinct seeds per split: the pool, the training queries and the test queries never share
    # an image.
    for name, n, offset in (("pool", d.n_pool, 1), ("train", d.n_train, 2), ("test", d.n_test, 3)):
        images, attrs = clip.make_pairs(
            n, seed=1000 * d.seed + offset, split="all", image_size=d.image_size
        )
        out[name] = {"attrs": attrs, "image": embed(enc_img, images)}
        if name == "pool":
            captions = [video.attribute_caption(a) for a in attrs]
            out[name]["text"] = embed(enc_txt, tok.encode(captions, model.cfg.text_length))
    zero_shot = clip.zero_shot_accuracy(
        model,
        tok,
        clip.make_pairs(d.n_test, seed=1000 * d.seed + 3, split="all", image_size=d.image_size)[0],
        clip.labels_of(out["test"]["attrs"], d.attribute),
        d.attribute,
    )
    return out, zero_shot


def _cache_path(key: dict) -> str:
    from jaxeff.data.images import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), "msier", f"scores-{digest}.npz")


def score_candidates(cfg: MsierConfig, lm, feats, cands, workdir: str):
    """``[n_train, C]`` NLL of each training query's gold answer with each candidate as its one
    demonstration; cached under ``$JAXEFF_CACHE/msier`` by the prompts' text (a rerun with the
    same data, CLIP and LM skips the LM)."""
    import numpy as np

    from jaxeff.retrieval import msier

    model, tokenizer = lm
    a = cfg.data.attribute
    pool, train = feats["pool"]["attrs"], feats["train"]["attrs"]
    head = instruction(a)
    prompts, answers = [], []
    for qi, row in enumerate(cands):
        query = picture_text(train[qi], a)
        gold = " " + answer_text(train[qi], a)
        for c in row:
            demo = [(picture_text(pool[c], a), answer_text(pool[c], a))]
            prompts.append(msier.icl_prompt(demo, query, head))
            answers.append(gold)
    path = _cache_path({"prompts": prompts, "answers": answers, "lm": "smollm2-135m-instruct"})
    cached = os.path.exists(path)
    if cached:
        with np.load(path, allow_pickle=False) as f:
            nll = f["nll"]
    else:
        nll = msier.answer_nll(
            model,
            [tokenizer.encode(p).ids for p in prompts],
            [tokenizer.encode(x).ids for x in answers],
            batch_size=cfg.scoring.batch_size,
            progress=cfg.progress,
        ).reshape(cands.shape)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path, nll=nll)
    np.savez(os.path.join(workdir, "lm_scores.npz"), nll=nll, candidates=cands)
    return nll, cached


def icl_accuracy(cfg: MsierConfig, lm, feats, picks) -> tuple[float, list[int]]:
    """Accuracy of SmolLM2 on the test queries with the pool examples ``picks[q]`` (best LAST,
    next to the query) as demonstrations; ``picks`` may have zero columns (zero-shot)."""
    import numpy as np

    from jaxeff.nn import clip
    from jaxeff.retrieval import msier

    model, tokenizer = lm
    a = cfg.data.attribute
    pool, test = feats["pool"]["attrs"], feats["test"]["attrs"]
    prompts = [
        msier.icl_prompt(
            [(picture_text(pool[c], a), answer_text(pool[c], a)) for c in row[::-1]],
            picture_text(test[qi], a),
            instruction(a),
        )
        for qi, row in enumerate(picks)
    ]
    preds = msier.icl_predict(
        model,
        tokenizer,
        prompts,
        clip.CLASS_NAMES[a],
        batch_size=cfg.eval.batch_size,
        progress=cfg.progress,
    )
    gold = clip.labels_of(test, a)
    return float(np.mean(preds == gold)), [int(p) for p in preds]


def same_answer_rate(picks, query_labels, pool_labels) -> float:
    import numpy as np

    picks = np.asarray(picks)
    return float(np.mean(pool_labels[picks] == np.asarray(query_labels)[:, None]))


def plot_accuracy(summary: dict, path: str) -> None:
    from jaxeff.plots import subplots

    names = ["zero_shot", "random", "unsupervised", "supervised_image_only", "supervised"]
    names = [n for n in names if f"acc_{n}" in summary]
    fig, ax = subplots(figsize=(7, 3.5))
    ax.bar(names, [summary[f"acc_{n}"] for n in names], color="tab:blue")
    ax.axhline(summary["chance"], color="gray", ls="--", label="chance")
    ax.set_ylabel("ICL accuracy")
    ax.set_title(f"MSIER: {summary['attribute']} questions, {summary['shots']} shots")
    ax.tick_params(axis="x", labelrotation=15)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


# --- the experiment ---------------------------------------------------------------------------


def run(cfg: MsierConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import tempfile

    import numpy as np

    from jaxeff.llm import load_gguf
    from jaxeff.nn import clip
    from jaxeff.retrieval import msier
    from jaxeff.train.metrics import MetricsWriter

    del resume  # LM scores are cached by content; everything else takes seconds to minutes
    check_config(cfg)
    workdir = workdir or tempfile.mkdtemp(prefix="jaxeff-msier-")
    os.makedirs(workdir, exist_ok=True)
    a = cfg.data.attribute
    feats, clip_zero_shot = make_features(cfg)
    pool, train, test = feats["pool"], feats["train"], feats["test"]
    pool_y = clip.labels_of(pool["attrs"], a)
    train_y = clip.labels_of(train["attrs"], a)
    test_y = clip.labels_of(test["attrs"], a)

    model, tokenizer, _ = load_gguf()
    lm = (model, tokenizer)
    s = cfg.scoring
    cands = msier.unsupervised_candidates(train["image"], pool["image"], s.candidates)
    nll, cached = score_candidates(cfg, lm, feats, cands, workdir)
    pos_c, neg_c = msier.select_positives_negatives(nll, s.n_pos, s.n_neg)
    pos = np.take_along_axis(cands, pos_c, axis=1)
    neg = np.take_along_axis(cands, neg_c, axis=1)

    writer = MetricsWriter(workdir)
    shots = cfg.eval.shots
    rng = np.random.default_rng(cfg.eval.seed)
    picks = {
        "random": np.stack([rng.choice(len(pool_y), shots, replace=False) for _ in test_y]),
        "unsupervised": msier.unsupervised_candidates(test["image"], pool["image"], shots),
    }
    r = cfg.retriever
    variants = [("supervised", True)]
    if cfg.eval.text_ablation:
        variants.append(("supervised_image_only", False))
    losses = {}
    for name, use_text in variants:
        rcfg = msier.RetrieverConfig(
            steps=r.steps,
            batch=r.batch,
            learning_rate=r.learning_rate,
            temperature=r.temperature,
            hidden=r.hidden,
            use_text=use_text,
            seed=r.seed,
        )
        text = pool["text"] if use_text else None
        untrained = msier.BiEncoder(pool["image"].shape[1], r.hidden, use_text, rngs=_rngs(r.seed))
        before = msier.retriever_loss(
            untrained, train["image"], pool["image"], text, pos, neg, r.temperature
        )
        retriever, curve = msier.train_retriever(
            train["image"], pool["image"], text, pos, neg, rcfg, progress=cfg.progress
        )
        after = msier.retriever_loss(
            retriever, train["image"], pool["image"], text, pos, neg, r.temperature
        )
        losses[name] = {"before": before, "after": after}
        for i, loss in enumerate(curve):
            if i % 10 == 0 or i == len(curve) - 1:
                writer.write(i + 1, f"retriever_{name}", {"loss": loss})
        scores = np.asarray(retriever.scores(test["image"], pool["image"], text))
        picks[name] = msier.top_k_indices(scores, shots)

    summary = {}
    preds = {}
    empty = np.zeros((len(test_y), 0), np.int64)
    for name, chosen in [("zero_shot", empty), *picks.items()]:
        acc, preds[name] = icl_accuracy(cfg, lm, feats, chosen)
        summary[f"acc_{name}"] = acc
    summary["same_answer"] = {
        name: same_answer_rate(chosen, test_y, pool_y) for name, chosen in picks.items()
    }
    summary["positives_same_answer"] = same_answer_rate(pos, train_y, pool_y)
    summary["negatives_same_answer"] = same_answer_rate(neg, train_y, pool_y)
    summary["candidates_same_answer"] = same_answer_rate(cands, train_y, pool_y)
    summary["retriever_loss_before"] = losses["supervised"]["before"]
    summary["retriever_loss_after"] = losses["supervised"]["after"]
    if "supervised_image_only" in losses:
        summary["retriever_image_only_loss_after"] = losses["supervised_image_only"]["after"]
    summary["nll_best_mean"] = float(np.mean(np.take_along_axis(nll, pos_c[:, :1], 1)))
    summary["nll_worst_mean"] = float(np.mean(np.take_along_axis(nll, neg_c[:, :1], 1)))
    summary["supervised_beats_unsupervised"] = (
        summary["acc_supervised"] > summary["acc_unsupervised"]
    )
    if "acc_supervised_image_only" in summary:
        summary["text_helps"] = summary["acc_supervised"] > summary["acc_supervised_image_only"]
    summary.update(
        attribute=a,
        shots=shots,
        chance=1.0 / len(clip.CLASS_NAMES[a]),
        clip_zero_shot=clip_zero_shot,
        n_train=len(train_y),
        n_test=len(test_y),
        candidates=s.candidates,
        lm_scores_cached=cached,
    )
    writer.write(1, "test", {k: v for k, v in summary.items() if isinstance(v, int | float | bool)})
    writer.close()
    with open(os.path.join(workdir, "predictions.json"), "w") as f:
        json.dump({"gold": [int(y) for y in test_y], "pred": preds}, f)
    plot_accuracy(summary, os.path.join(workdir, "accuracy.png"))
    print_table(summary)
    return summary


def _rngs(seed: int):
    from flax import nnx

    return nnx.Rngs(params=seed)


def print_table(summary: dict) -> None:
    rows = [("zero-shot", "zero_shot")]
    rows += [(n, n) for n in ("random", "unsupervised", "supervised_image_only", "supervised")]
    print(f"{'selection':<24}{'ICL acc':>9}{'same answer':>13}")
    for label, key in rows:
        if f"acc_{key}" not in summary:
            continue
        same = summary["same_answer"].get(key)
        same = "-" if same is None else f"{same:.3f}"
        print(f"{label:<24}{summary[f'acc_{key}']:>9.3f}{same:>13}")


EXPERIMENTS = {
    "msier": Experiment(get_config, run, presets=("smoke", "cpu"), doc=__doc__),
}
