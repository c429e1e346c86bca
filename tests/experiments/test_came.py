"""came-lm and optim-bench smoke presets: JSON contract, state bytes from SPECS.md, learning."""

import math
import os

import numpy as np
import pytest

from jaxeff.experiments import came as came_exp
from jaxeff.train.metrics import read_metrics

OPTIMIZERS = {"came", "adamw", "adafactor"}


def _came_floats(shape):
    """SPECS.md: B*n*m + 2B(n+m) floats for (*B, n, m); momentum and v for vectors."""
    if len(shape) < 2:
        return 2 * math.prod(shape)
    *batch, n, m = shape
    b = math.prod(batch)
    return b * n * m + 2 * b * (n + m)


def test_came_lm_smoke_contract_state_bytes_and_learning(tmp_path):
    import jax
    from flax import nnx

    from jaxeff.nn.transformer import Transformer

    cfg = came_exp.get_config("smoke")
    out = came_exp.run(cfg, workdir=str(tmp_path))
    assert set(out["val_loss"]) == set(out["state_bytes"]) == OPTIMIZERS

    vocab = int(round(math.exp(out["uniform_loss"])))
    mcfg = cfg.lm.model_for(vocab)
    model = nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0)))
    shapes = [x.shape for x in jax.tree.leaves(nnx.state(model))]
    n = sum(math.prod(s) for s in shapes)
    assert n == out["params"]
    # float32 buffers plus one int32 step counter per counted schedule / Adam count
    assert out["state_bytes"]["came"] == 4 * sum(map(_came_floats, shapes)) + 4
    assert out["state_bytes"]["adamw"] == 4 * 2 * n + 4 + 4
    assert out["state_bytes"]["came"] < 0.55 * out["state_bytes"]["adamw"]

    # CAME learns: from the uniform guess at init to clearly below it in 20 steps
    assert abs(out["init_val_loss"] - out["uniform_loss"]) < 0.1
    assert out["val_loss"]["came"] < out["init_val_loss"] - 0.5
    assert all(np.isfinite(v) for v in out["val_loss"].values())

    records = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    val = [r for r in records if r["split"] == "val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == cfg.lm.train.steps
    for name in OPTIMIZERS:
        assert val[0][f"{name}/loss"] == out["init_val_loss"]
        assert val[-1][f"{name}/loss"] == out["val_loss"][name]
        assert os.path.exists(os.path.join(tmp_path, name, "metrics.jsonl"))
    assert os.path.getsize(os.path.join(tmp_path, "val_loss.png")) > 1000


@pytest.mark.interop
def test_optim_bench_smoke_contract_and_state_bytes():
    cfg = came_exp.get_bench_config("smoke")
    out = came_exp.run_bench(cfg)
    keys = {"came_step_s", "came_pytorch_step_s", "step_ratio_vs_pytorch", "state_ratio_vs_adamw"}
    assert keys <= set(out)
    assert out["came_step_s"] > 0 and out["came_pytorch_step_s"] > 0
    assert out["step_ratio_vs_pytorch"] == out["came_step_s"] / out["came_pytorch_step_s"]

    shapes = list(came_exp.gpt2_shapes(cfg).values())
    assert len(shapes) == 2 + 12 * cfg.n_layers + 2
    n = sum(math.prod(s) for s in shapes)
    assert out["params"] == n
    sizes = out["state_bytes"]
    assert sizes["came"] == 4 * sum(map(_came_floats, shapes))  # constant lr: no counter
    assert sizes["adamw"] == 4 * 2 * n + 4
    assert out["state_ratio_vs_adamw"] == sizes["came"] / sizes["adamw"]
    assert out["adafactor_state_bytes"] == sizes["adafactor"] < sizes["adamw"]
    assert len(out["step_times_s"]["came"]) == cfg.repeats

    # every optimizer timed side by side (medians), and the goals of issue 23 judged in the JSON
    assert set(out["step_s"]) == {"came", "came_pytorch", "adamw", "adafactor"}
    assert all(v > 0 for v in out["step_s"].values())
    assert out["adamw_step_s"] == out["step_s"]["adamw"]
    assert out["adafactor_step_s"] == out["step_s"]["adafactor"]
    assert out["step_ratio_vs_adamw"] == out["came_step_s"] / out["adamw_step_s"]
    goals = {"step_ratio_vs_adamw<=1.3", "step_ratio_vs_pytorch<=0.2", "state_ratio_vs_adamw<=0.55"}
    assert set(out["goals"]) == goals
    for goal, met in out["goals"].items():
        key, limit = goal.split("<=")
        assert met is (out[key] <= float(limit)), goal


def test_full_size_bench_shapes_are_gpt2_small():
    shapes = came_exp.gpt2_shapes(came_exp.get_bench_config("cpu"))
    assert sum(math.prod(s) for s in shapes.values()) == 124_439_808  # GPT-2 small, tied head
