"""On-chip memory each attention block configuration needs, counted by hand against the chips.

Lowering does not compile (Mosaic TPU serializes at export; Triton's PTX is built on the
device), so an over-large block table would only fail on the device. These counts are the
check that can run here: `tpu_vmem_bytes` for the Mosaic kernels (`.tpu`), whose pipeline
double-buffers every blocked operand in VMEM, and `gpu_smem_bytes` for the Triton kernels
(`.gpu`), whose software pipeline stages ``num_stages`` copies of the streamed K/V (or Q/dO)
tiles in shared memory, plus the resident tile and the probability tile fed to the second dot.
Both are upper estimates (the compilers may keep some of it in registers).

Limits: TPU scoped VMEM by default 16 MiB on v5e (32 MiB on v6e; physical 128 MiB);
H100 / H200 shared memory 227 KiB (232448 bytes) per thread block.
"""

from __future__ import annotations

from jaxeff.kernels.attention import gpu, tpu

TPU_SCOPED_VMEM = {"v5e": 16 * 2**20, "v6e": 32 * 2**20}
H100_SMEM = 232448
LANES, SUBLANES, F32 = 128, 8, 4


def tpu_vmem_bytes(bq: int, bk: int, d: int, itemsize: int, *, kind: str, segments: bool) -> int:
    """VMEM of one program of the TPU ``kind`` kernel (``"fwd"``, ``"dkdv"``, ``"dq"``)."""
    seg = 2 * (bq * LANES + SUBLANES * bk) * F32 if segments else 0  # double-buffered ids
    if kind == "fwd":
        blocks = 2 * ((bq + 2 * bk) * d * itemsize + bq * d * itemsize + bq * LANES * F32)
        scratch = 2 * bq * LANES * F32 + bq * d * F32
        temps = 3 * bq * bk * F32  # s, p, mask
    elif kind in ("dkdv", "dq"):
        blocks = 2 * ((2 * bq + 2 * bk) * d * itemsize + 2 * bq * LANES * F32)
        out_rows = bk if kind == "dkdv" else bq
        n_out = 2 if kind == "dkdv" else 1
        blocks += 2 * n_out * out_rows * d * itemsize
        scratch = n_out * out_rows * d * F32
        temps = 5 * bq * bk * F32  # s / p, dp, ds, mask, lse lanes
    else:
        raise ValueError(f"kind={kind!r}; allowed: fwd, dkdv, dq")
    return blocks + scratch + temps + seg


def gpu_smem_bytes(bq: int, bk: int, dp: int, itemsize: int, num_stages: int, *, kind: str) -> int:
    """Shared memory of one program of the Triton ``kind`` kernel."""
    if kind == "fwd":  # Q resident; K, V streamed; P re-staged for P V
        return (bq * dp + num_stages * 2 * bk * dp + bq * bk) * itemsize
    if kind == "dkdv":  # K, V resident; Q, dO streamed; P and dS re-staged
        return (2 * bk * dp + num_stages * 2 * bq * dp + 2 * bq * bk) * itemsize
    if kind == "dq":  # Q, dO resident; K, V streamed; dS re-staged
        return (2 * bq * dp + num_stages * 2 * bk * dp + bq * bk) * itemsize
    raise ValueError(f"kind={kind!r}; allowed: fwd, dkdv, dq")


def table_budgets(t: int, s: int, d: int, itemsize: int, segments: bool = True) -> dict:
    """Bytes per kernel for the block sizes the tables pick at these shapes."""
    t_pad, s_pad = tpu.round_up(t, LANES), tpu.round_up(s, LANES)
    tcfg = tpu.block_config(t_pad, s_pad)
    out = {}
    for kind in ("fwd", "dkdv", "dq"):
        c = tcfg["fwd" if kind == "fwd" else "bwd"]
        out[f"tpu_{kind}"] = tpu_vmem_bytes(
            c["bq"], c["bk"], d, itemsize, kind=kind, segments=segments
        )
    gcfg = gpu.block_config(d)
    for kind in ("fwd", "dkdv", "dq"):
        c = gcfg["fwd" if kind == "fwd" else "bwd"]
        bq = min(c["bq"], max(16, gpu.next_pow2(t)))
        bk = min(c["bk"], max(16, gpu.next_pow2(s)))
        out[f"gpu_{kind}"] = gpu_smem_bytes(
            bq, bk, gcfg["dp"], itemsize, c["num_stages"], kind=kind
        )
    return out
