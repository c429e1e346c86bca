"""Byte counts from compiled HLO: the parser on a hand-written module, and DSP against Ulysses
and ring on 8 simulated devices."""

import subprocess
import sys
import textwrap

import pytest

from jaxeff.parallel.comm import collective_bytes
from jaxeff.parallel.multiprocess import cpu_child_env

HLO = """\
HloModule m, entry_computation_layout={(f32[1,8,2]{2,1,0})->f32[1,8,2]{2,1,0}}

%body (p: (s32[], f32[1,8,2])) -> (s32[], f32[1,8,2]) {
  %p = (s32[], f32[1,8,2]{2,1,0}) parameter(0)
  %x = f32[1,8,2]{2,1,0} get-tuple-element(%p), index=1
  %ppermute.1 = f32[1,8,2]{2,1,0} collective-permute(%x), channel_id=1
  ROOT %t = (s32[], f32[1,8,2]{2,1,0}) tuple(%i, %ppermute.1)
}

%cond (p: (s32[], f32[1,8,2])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main.1 (x: f32[1,8,2]) -> f32[1,8,2] {
  %x = f32[1,8,2]{2,1,0} parameter(0)
  %all-to-all = (f32[1,4,2]{2,1,0}, f32[1,4,2]{2,1,0}) all-to-all(%a, %b)
  %all-reduce.3 = bf16[10]{0} all-reduce(%y), channel_id=3, to_apply=%add
  %while.1 = (s32[], f32[1,8,2]{2,1,0}) while(%init), condition=%cond, body=%body, \
backend_config={"known_trip_count":{"n":"7"}}
  ROOT %out = f32[1,8,2]{2,1,0} get-tuple-element(%while.1), index=1
}
"""


def test_parser_sums_tuple_chunks_and_multiplies_by_trip_count():
    got = collective_bytes(HLO)
    assert got["all-to-all"] == 2 * 4 * 2 * 4  # both chunks of the tuple
    assert got["all-reduce"] == 10 * 2
    assert got["collective-permute"] == 7 * 8 * 2 * 4  # inside a loop of 7 trips
    assert got["all-gather"] == got["reduce-scatter"] == 0
    assert got["total"] == 64 + 20 + 448
    with pytest.raises(ValueError, match="no ENTRY computation"):
        collective_bytes("%f (x: f32[]) -> f32[] {\n}\n")


SCRIPT = textwrap.dedent(
    """
    import os
    from jaxeff.parallel.multiprocess import simulated_devices_xla_flags
    os.environ["XLA_FLAGS"] = simulated_devices_xla_flags(8)
    import jax, jax.numpy as jnp
    from flax import nnx
    from jaxeff.nn.video import STBlock, block_params
    from jaxeff.parallel.comm import sequence_parallel_bytes

    B, T, S, C, H, N = 1, 8, 8, 16, 8, 8
    params = block_params(STBlock(C, heads=H, rngs=nnx.Rngs(0)))  # random: distinct weights
    x = jax.ShapeDtypeStruct((B, T, S, C), jnp.float32)
    m_over_n = B * T * S * C * 4 / N
    mesh = jax.make_mesh((N,), ("seq",))
    fwd = {
        m: sequence_parallel_bytes(m, params, x, mesh=mesh, heads=H)
        for m in ("dsp", "ulysses", "ring")
    }
    print("DSP", fwd["dsp"]["all-to-all"] / m_over_n, fwd["dsp"]["total"] / m_over_n)
    print("ULYSSES", fwd["ulysses"]["all-to-all"] / m_over_n, fwd["ulysses"]["total"] / m_over_n)
    print("RING", fwd["ring"]["collective-permute"] / m_over_n, fwd["ring"]["total"] / m_over_n)
    print("RATIO_FWD", fwd["ulysses"]["total"] / fwd["dsp"]["total"])
    both = {
        m: sequence_parallel_bytes(m, params, x, mesh=mesh, heads=H, backward=True)
        for m in ("dsp", "ulysses")
    }
    print("RATIO_FWD_BWD_A2A", both["ulysses"]["all-to-all"] / both["dsp"]["all-to-all"])
    """
)


def test_ulysses_moves_four_times_the_bytes_of_dsp_on_8_devices():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_child_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout
    assert "DSP 2.0 2.0" in lines, lines  # 2 M/N: one all-to-all per switch
    assert "ULYSSES 8.0 8.0" in lines, lines  # q, k, v, o of two attentions
    assert "RING 28.0 28.0" in lines, lines  # k, v for N - 1 hops, two attentions: 4 (N-1) M/N
    assert "RATIO_FWD 4.0" in lines, lines
    assert "RATIO_FWD_BWD_A2A 4.0" in lines, lines
