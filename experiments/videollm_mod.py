"""VideoLLM-MoD (Wu et al., NeurIPS 2024): vision tokens skip interleaved layers, text never does.

``videollm-mod``: a small streaming video-LLM (`jaxeff.nn.videollm`: per frame a ``<frame>``
token and the frame's patch tokens, after each scene its caption; Llama blocks) trained to
caption Vript-style synthetic clips (`jaxeff.data.video`: digit sprites moving over textured
backgrounds under pans, tilts and zooms, one caption per scene), twice from the same
initialisation, on the same batches in the same order: dense, and with VideoLLM-MoD routing at
``r = 0.2`` in every other layer (20% of each frame's vision tokens computed, chosen by a
learned router per frame; text always computed; the skipped tokens are gathered out of the
layer, so they are absent from its attention and activations). Caption tokens are a byte-level
BPE trained on the training captions. Vision tokens are ~90% of the sequence, as in real
video-LLMs.

    jaxeff run videollm-mod --preset cpu     # 8 min on 2 shared cores at load ~4 (~15 at ~12)
    jaxeff run videollm-mod --preset smoke   # seconds; what the tests run

Measured quantities:

* step time: the two variants' train steps (AOT-compiled, state donated) run round-robin, one
  step of each in turn, every step timed (`jaxeff.bench.interleaved_times`: the training IS
  the benchmark); the median per variant. ``step_time_ratio`` = mod / dense.
* peak memory: from XLA's compiled memory analysis of each train step,
  ``argument + output - alias + temp`` bytes (inputs, outputs not written in place of a
  donated input, and the scratch of the step: activations kept for the backward pass).
  ``peak_mem_ratio`` = mod / dense; ``temp_bytes`` alone is reported too.
* caption loss: mean next-token cross-entropy (nats) of the caption words and their ``<eos>``
  on held-out clips (clip indices after the training ones), after training.
* ``loss_wrong_video``: the same held-out captions with each clip's frames swapped for the
  next held-out clip's; its excess over the held-out loss is what the video explains.
* ``flop_ratio``: XLA's cost analysis of the two train steps.

Paper's claim: ~42% less training time and ~30% less memory than the dense model at equal or
better quality. Targets (a goal, not a test): ``step_time_ratio`` <= 0.7, ``peak_mem_ratio``
<= 0.8, ``loss_mod`` within 5% of ``loss_dense``.

Measured here (cpu preset: 8 frames of 32x32, 64 patches each, 2 scenes' caption blocks of 40
tokens: 600 tokens, 85% vision; 4 layers of width 128, layers 1 and 3 routed, 184 tokens
computed there; batch 4, 240 steps at peak lr 2e-3, 256 training and 32 held-out clips; 2
cores shared with other jobs): step 1.02 s dense vs 0.65 s routed (``step_time_ratio`` 0.633,
goal met; 0.612 and 0.637 in 100-step runs at load ~12), peak 505 MB vs 315 MB
(``peak_mem_ratio`` 0.624, goal met; scratch alone 494 vs 304 MB), XLA FLOPs ratio 0.616,
held-out caption loss 0.752 dense vs 0.773 routed nats/token (+2.8%, goal met; ln(514) = 6.2
for a uniform guess). With each clip's frames swapped for another clip's the loss rises to
0.858 (dense, +0.106) and 0.812 (routed, +0.038): both models read the video, the routed one
less so far. After 100 steps neither did (swap: +0.002), so short runs say nothing about
vision quality. At peak lr 3e-3 (240 steps) the dense model reached 0.757 but the routed one
diverged near step 70 (train loss 1.0 -> 4.4, no recovery): routed training is less stable at
high learning rates here. Next: log router-score and gradient-norm statistics, and try a
router z-loss, an RMS-normalised router input or a lower router learning rate.

JSON: ``step_time_ratio``, ``peak_mem_ratio``, ``loss_dense``, ``loss_mod``, and
``step_time_s``, ``peak_mem_bytes``, ``temp_bytes``, ``flops``, ``train_loss``,
``loss_wrong_video`` per variant
(``dense``, ``mod``), ``flop_ratio``, ``routed_frac`` (share of the tokens a routed layer
computes), ``vision_frac``, ``seq_len``, ``params``, ``steps``.

Reference: Wu et al., VideoLLM-MoD: Efficient Video-Language Streaming with Mixture-of-Depths
Vision Computation, NeurIPS 2024 (https://arxiv.org/abs/2408.16730).
"""

from __future__ import annotations

import dataclasses
import os

from jaxeff.experiment import Experiment
from jaxeff.nn.config import VideoLLMConfig
from jaxeff.train.recipe import OptimConfig

VARIANTS = ("dense", "mod")


@dataclasses.dataclass(frozen=True)
class VideoLLMModConfig:
    """Clips and model (``model``: `jaxeff.nn.config.VideoLLMConfig`), routing, training
    (``optim``: the recipe's clipped warmup-cosine AdamW, here with optax's default b2)."""

    model: VideoLLMConfig = VideoLLMConfig(frames=8, caption_len=40)
    r: float = 0.2
    train_clips: int = 256
    eval_clips: int = 32
    batch_size: int = 4
    steps: int = 240
    optim: OptimConfig = OptimConfig(
        learning_rate=2e-3, warmup_steps=10, weight_decay=0.01, b2=0.999, clip_norm=1.0
    )
    log_every: int = 10
    progress: bool = True
    seed: int = 0


def get_config(preset: str) -> VideoLLMModConfig:
    if preset == "smoke":
        return VideoLLMModConfig(
            model=VideoLLMConfig(
                frames=4,
                height=16,
                width=16,
                caption_len=16,
                text_vocab=300,
                dim=32,
                n_layers=2,
                n_heads=2,
                n_kv_heads=2,
                ffn_dim=64,
            ),
            train_clips=8,
            eval_clips=4,
            batch_size=2,
            steps=4,
            log_every=2,
            progress=False,
        )
    if preset == "cpu":
        return VideoLLMModConfig()
    raise ValueError(f"unknown preset {preset!r}; allowed: smoke, cpu")


def _check(cfg: VideoLLMModConfig) -> None:
    if not 0.0 < cfg.r <= 1.0:
        raise ValueError(f"r must be in (0, 1], got {cfg.r}")
    for name in ("train_clips", "eval_clips", "batch_size", "steps", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.batch_size > cfg.train_clips:
        raise ValueError(
            f"batch_size={cfg.batch_size} exceeds train_clips={cfg.train_clips}; lower it"
        )


def make_data(cfg: VideoLLMModConfig):
    """Training and held-out batches (numpy) and the caption tokenizer."""
    from jaxeff.data.tokenize import train_bpe_tokenizer
    from jaxeff.data.video import make_clips
    from jaxeff.nn.videollm import make_batch

    mcfg = cfg.model
    kw = dict(frames=mcfg.frames, height=mcfg.height, width=mcfg.width, seed=cfg.seed)
    kw["scenes"] = (1, mcfg.max_scenes)
    train_frames, train_meta = make_clips(cfg.train_clips, **kw)
    eval_frames, eval_meta = make_clips(cfg.eval_clips, start=cfg.train_clips, **kw)
    captions = [c for m in train_meta for c in m.captions]
    tokenizer = train_bpe_tokenizer(captions, mcfg.text_vocab)

    def batch(frames, metas):
        ids = [[tokenizer.encode(c).ids for c in m.captions] for m in metas]
        return make_batch(frames, [m.frame_ranges for m in metas], ids, mcfg)

    return batch(train_frames, train_meta), batch(eval_frames, eval_meta), tokenizer


def memory_bytes(compiled) -> dict:
    """``argument + output - alias + temp`` bytes of a compiled step, and ``temp`` alone."""
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {"peak": int(peak), "temp": int(m.temp_size_in_bytes)}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def _slice(data: dict, idx):
    return {k: v[idx] for k, v in data.items()}


def run(cfg: VideoLLMModConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxeff.bench import interleaved_times
    from jaxeff.nn.videollm import VideoLLM, make_loss_fn
    from jaxeff.train.loop import evaluate, make_eval_step, make_train_step, progress
    from jaxeff.train.metrics import MetricsWriter
    from jaxeff.train.state import create_train_state

    del resume  # a run is minutes long and benchmarks both variants side by side: no resume
    _check(cfg)
    mcfg = cfg.model
    train, held_out, _ = make_data(cfg)
    graphdef, params = nnx.split(VideoLLM(mcfg, rngs=nnx.Rngs(params=cfg.seed)))
    n_params = int(sum(x.size for x in jax.tree.leaves(params)))
    tx = cfg.optim.build(cfg.steps)
    routes = {"dense": None, "mod": cfg.r}
    rng = np.random.default_rng(cfg.seed)
    order = [rng.choice(cfg.train_clips, cfg.batch_size, replace=False) for _ in range(cfg.steps)]
    first = _slice(train, order[0])
    states, compiled, memory, flops = {}, {}, {}, {}
    for name, r in routes.items():
        state = create_train_state(jax.tree.map(jnp.copy, params), tx, cfg.seed)
        step = make_train_step(graphdef, tx, make_loss_fn(r))
        compiled[name] = step.lower(state, first).compile()
        memory[name] = memory_bytes(compiled[name])
        flops[name] = _flops(compiled[name])
        states[name] = state

    history = {name: [] for name in routes}
    cursor = dict.fromkeys(routes, 0)
    bar = progress(cfg.steps * len(routes), desc="videollm-mod", enabled=cfg.progress)

    def stepper(name):
        def call():
            batch = _slice(train, order[cursor[name]])
            states[name], metrics = compiled[name](states[name], batch)
            history[name].append(metrics)
            cursor[name] += 1
            bar.update(1)
            return states[name]

        return call

    times = interleaved_times({n: stepper(n) for n in routes}, repeats=cfg.steps, warmup=0)
    bar.close()
    # the first step of each runs cold (allocations, caches): it is left out of the median
    step_time = {n: float(np.median(t[1:] if len(t) > 1 else t)) for n, t in times.items()}

    eval_batches = [
        _slice(held_out, slice(i, i + cfg.batch_size))
        for i in range(0, cfg.eval_clips, cfg.batch_size)
    ]
    # the same captions with each clip's frames replaced by the next held-out clip's: how much
    # of the caption loss the video explains
    shuffled = dict(held_out, patches=np.roll(held_out["patches"], 1, axis=0))
    shuffled_batches = [
        _slice(shuffled, slice(i, i + cfg.batch_size))
        for i in range(0, cfg.eval_clips, cfg.batch_size)
    ]
    results, results_shuffled = {}, {}
    for name, r in routes.items():
        eval_step = make_eval_step(graphdef, make_loss_fn(r))
        results[name] = evaluate(eval_step, states[name].params, eval_batches)
        results_shuffled[name] = evaluate(eval_step, states[name].params, shuffled_batches)

    writer = None
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        writer = MetricsWriter(workdir)
    train_loss = {n: [float(m["loss"]) for m in h] for n, h in history.items()}
    routed_frac = float(history["mod"][-1]["routed_frac"])
    if writer is not None:
        for s in range(cfg.steps):
            if (s + 1) % cfg.log_every == 0 or s + 1 == cfg.steps:
                rec = {f"{n}/loss": train_loss[n][s] for n in routes}
                rec.update({f"{n}/step_time_s": times[n][s] for n in routes})
                writer.write(s + 1, "train", rec)
        writer.write(cfg.steps, "val", {f"{n}/loss": results[n]["loss"] for n in routes})
        writer.close()
        from jaxeff.plots import plot_val_curves

        curves = {
            n: [(s + 1, train_loss[n][s]) for s in range(cfg.steps) if (s + 1) % cfg.log_every == 0]
            for n in routes
        }
        if all(curves.values()):
            plot_val_curves(
                curves,
                os.path.join(workdir, "train_loss.png"),
                "videollm-mod: caption loss",
                ylabel="train caption cross-entropy (nats/token)",
            )

    out = {
        "step_time_ratio": step_time["mod"] / step_time["dense"],
        "peak_mem_ratio": memory["mod"]["peak"] / memory["dense"]["peak"],
        "loss_dense": results["dense"]["loss"],
        "loss_mod": results["mod"]["loss"],
        "step_time_s": step_time,
        "peak_mem_bytes": {n: memory[n]["peak"] for n in routes},
        "temp_bytes": {n: memory[n]["temp"] for n in routes},
        "flops": flops,
        "flop_ratio": flops["mod"] / flops["dense"],
        "loss_wrong_video": {n: results_shuffled[n]["loss"] for n in routes},
        "train_loss": {n: float(np.mean(train_loss[n][-cfg.log_every :])) for n in routes},
        "routed_frac": routed_frac,
        "vision_frac": mcfg.num_vision / mcfg.seq_len,
        "seq_len": mcfg.seq_len,
        "params": n_params,
        "steps": cfg.steps,
    }
    _print_table(out, cfg, mcfg)
    return out


def _print_table(out: dict, cfg: VideoLLMModConfig, mcfg) -> None:
    print(
        f"clips {mcfg.frames}x{mcfg.height}x{mcfg.width}, {mcfg.patches_per_frame} patches/frame; "
        f"sequence {mcfg.seq_len} tokens ({100 * out['vision_frac']:.0f}% vision); "
        f"{mcfg.n_layers} layers, routed {list(mcfg.routed_layers())} at r={cfg.r} "
        f"({mcfg.routed_tokens(cfg.r)} tokens computed there); batch {cfg.batch_size}, "
        f"{cfg.steps} steps"
    )
    print(
        f"{'variant':>8} {'step ms':>8} {'peak MB':>8} {'temp MB':>8} {'GFLOP':>8} "
        f"{'train loss':>10} {'held-out loss':>13} {'wrong video':>11}"
    )
    for n in VARIANTS:
        print(
            f"{n:>8} {1e3 * out['step_time_s'][n]:>8.1f} {out['peak_mem_bytes'][n] / 1e6:>8.1f} "
            f"{out['temp_bytes'][n] / 1e6:>8.1f} {out['flops'][n] / 1e9:>8.2f} "
            f"{out['train_loss'][n]:>10.3f} {out['loss_' + n]:>13.3f} "
            f"{out['loss_wrong_video'][n]:>11.3f}"
        )
    rel = out["loss_mod"] / out["loss_dense"] - 1
    print(
        f"step_time_ratio {out['step_time_ratio']:.3f} (goal <= 0.7), peak_mem_ratio "
        f"{out['peak_mem_ratio']:.3f} (goal <= 0.8), caption loss mod vs dense {100 * rel:+.1f}% "
        f"(goal within 5%), flop_ratio {out['flop_ratio']:.3f}"
    )


EXPERIMENTS = {
    "videollm-mod": Experiment(get_config, run, presets=("smoke", "cpu"), doc=__doc__),
}
