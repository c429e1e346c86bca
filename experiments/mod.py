"""Mixture-of-Depths: compute saved by routing tokens around a decoder block.

``mod-bench``: one decoder block of the shared Llama-style decoder (`jaxeff.nn.transformer.Block`:
RMSNorm, causal GQA attention with RoPE, SwiGLU MLP) on ``x [B, L, D]``, dense against the same
block behind a Mixture-of-Depths router (`jaxeff.nn.mod`: expert-choice top-k over the sequence,
``k = capacity * L`` tokens per row, gathered in position order with their ORIGINAL RoPE
positions, output scaled by the router logit and scattered back; the other tokens skip the
block). For capacities 0.5, 0.25 and 0.125: the FLOPs of the jitted forward + backward from XLA's
cost analysis, and its median wall time (dense and routed timed round-robin in one process).

    jaxeff run mod-bench --preset cpu    # ~2 min on 2 cores

Theory: the MLP and projections scale with ``k`` (ratio ``c``), attention with ``k^2`` (``c^2``);
the router adds ``B L D`` multiply-adds and the top-k, gather and scatter are memory work. So the
FLOP ratio tends to ``c`` from above as ``L`` grows relative to ``D`` ... and to ``c^2`` where
attention dominates.

JSON: ``flop_ratio_0125``, ``wall_ratio_0125`` (routed / dense at capacity 0.125), and
``by_capacity``: per capacity ``k``, ``flops``, ``flop_ratio``, ``wall_s``, ``wall_ratio``;
``dense_flops``, ``dense_wall_s``, ``shape``. Targets (Raposo et al., 2024; a goal rather than a
test): ``flop_ratio_0125`` <= 0.1 and ``wall_ratio_0125`` <= 0.2.

Reference: Raposo et al., Mixture-of-Depths: Dynamically allocating compute in
transformer-based language models, 2024 (https://arxiv.org/abs/2404.02258).
"""

from __future__ import annotations

import dataclasses

from jaxeff.experiment import Experiment


@dataclasses.dataclass(frozen=True)
class ModBenchConfig:
    batch: int = 4
    seq_len: int = 1024
    dim: int = 256
    heads: int = 4
    kv_heads: int = 2
    ffn_dim: int = 704
    capacities: tuple[float, ...] = (0.5, 0.25, 0.125)
    repeats: int = 7
    seed: int = 0


def get_bench_config(preset: str) -> ModBenchConfig:
    if preset == "smoke":
        return ModBenchConfig(
            batch=1, seq_len=64, dim=32, heads=2, kv_heads=1, ffn_dim=64, repeats=1
        )
    return ModBenchConfig()


def _block_fns(cfg: ModBenchConfig):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxeff.nn import mod
    from jaxeff.nn.attention import causal_mask
    from jaxeff.nn.rope import rope_cos_sin, rope_frequencies
    from jaxeff.nn.transformer import Block, TransformerConfig

    mcfg = TransformerConfig(
        vocab_size=8,
        dim=cfg.dim,
        n_layers=1,
        n_heads=cfg.heads,
        n_kv_heads=cfg.kv_heads,
        ffn_dim=cfg.ffn_dim,
        max_seq_len=cfg.seq_len,
    )
    graphdef, block_params = nnx.split(Block(mcfg, rngs=nnx.Rngs(cfg.seed)))
    router = 0.02 * jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.dim,))
    params = {"block": block_params, "router": router}
    inv_freq, factor = rope_frequencies(mcfg.head_dim, mcfg.rope_base, None)

    def block_fn(p, x, positions):
        # positions [B, n] are the tokens' original positions: RoPE sees them unchanged; the
        # gathered tokens are in position order, so index-causal is position-causal
        cos, sin = rope_cos_sin(positions, inv_freq, factor)
        return nnx.merge(graphdef, p)(x, cos, sin, causal_mask(x.shape[1]))

    def dense(params, x, positions):
        return block_fn(params["block"], x, positions)

    def routed(params, x, positions, capacity):
        logits = x @ params["router"]  # [B, L]
        route = mod.topk_route(logits, capacity)
        return mod.routed_block(
            lambda xs, ps: block_fn(params["block"], xs, ps), x, positions, route, logits
        )

    def fwd_bwd(forward):
        def loss(params, x, positions, w):
            return jnp.sum(forward(params, x, positions) * w)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    return params, dense, routed, fwd_bwd


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost["flops"])


def run_bench(cfg: ModBenchConfig, workdir: str | None = None, resume: bool = False) -> dict:
    import functools
    import os

    import jax

    from jaxeff.bench import interleaved_median_times
    from jaxeff.nn.mod import capacity_to_k

    for c in cfg.capacities:
        if not 0.0 < c <= 1.0:
            raise ValueError(f"capacities: {c} is not in (0, 1]")
    if 0.125 not in cfg.capacities:
        raise ValueError(f"capacities = {cfg.capacities} must include 0.125 (the JSON's key)")
    params, dense, routed, fwd_bwd = _block_fns(cfg)
    keys = jax.random.split(jax.random.key(cfg.seed + 2), 2)
    shape = (cfg.batch, cfg.seq_len, cfg.dim)
    x = jax.random.normal(keys[0], shape)
    w = jax.random.normal(keys[1], shape)
    positions = jax.numpy.broadcast_to(jax.numpy.arange(cfg.seq_len), shape[:2])
    args = (params, x, positions, w)
    compiled = {"dense": fwd_bwd(dense).lower(*args).compile()}
    for c in cfg.capacities:
        fn = fwd_bwd(functools.partial(routed, capacity=c))
        compiled[str(c)] = fn.lower(*args).compile()
    flops = {name: _flops(comp) for name, comp in compiled.items()}
    calls = {name: functools.partial(comp, *args) for name, comp in compiled.items()}
    walls = interleaved_median_times(calls, repeats=cfg.repeats, warmup=1)
    by_capacity = {}
    for c in cfg.capacities:
        name = str(c)
        by_capacity[name] = {
            "k": capacity_to_k(cfg.seq_len, c),
            "flops": flops[name],
            "flop_ratio": flops[name] / flops["dense"],
            "wall_s": walls[name],
            "wall_ratio": walls[name] / walls["dense"],
        }
    out = {
        "flop_ratio_0125": by_capacity["0.125"]["flop_ratio"],
        "wall_ratio_0125": by_capacity["0.125"]["wall_ratio"],
        "dense_flops": flops["dense"],
        "dense_wall_s": walls["dense"],
        "shape": list(shape),
        "by_capacity": by_capacity,
    }
    print(f"x [B, L, D] = {list(shape)}; forward + backward of one decoder block")
    print(
        f"{'capacity':>8} {'k':>5} {'GFLOP':>8} {'flop ratio':>10} {'wall ms':>8} "
        f"{'wall ratio':>10}"
    )
    print(
        f"{'dense':>8} {cfg.seq_len:>5} {flops['dense'] / 1e9:>8.3f} {1.0:>10.3f} "
        f"{1e3 * walls['dense']:>8.2f} {1.0:>10.3f}"
    )
    for name, r in by_capacity.items():
        print(
            f"{name:>8} {r['k']:>5} {r['flops'] / 1e9:>8.3f} {r['flop_ratio']:>10.3f} "
            f"{1e3 * r['wall_s']:>8.2f} {r['wall_ratio']:>10.3f}"
        )
    print(
        f"capacity 0.125: flop ratio {out['flop_ratio_0125']:.3f} (goal <= 0.1), wall ratio "
        f"{out['wall_ratio_0125']:.3f} (goal <= 0.2)"
    )
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    return out


EXPERIMENTS = {
    "mod-bench": Experiment(get_bench_config, run_bench, presets=("smoke", "cpu"), doc=__doc__),
}
