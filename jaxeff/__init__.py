"""jaxeff: training- and inference-efficiency methods for large models, reimplemented in JAX.

The subpackages load on first use (``from jaxeff import nn, optim``), so ``import jaxeff``
imports neither jax nor any subpackage.
"""

from jaxeff._lazy import attach as _attach

_getattr, _dir, __all__ = _attach(
    __name__,
    submodules=(
        "cl",
        "data",
        "evals",
        "experiments",
        "infer",
        "kernels",
        "llm",
        "nn",
        "optim",
        "parallel",
        "prompt",
        "retrieval",
        "train",
    ),
)
__all__ = ["__version__", *__all__]


def __getattr__(name: str):
    # read on first use too: importlib.metadata alone takes ~30 ms to import
    if name == "__version__":
        from importlib import metadata

        try:
            version = metadata.version("jaxeff")
        except metadata.PackageNotFoundError:
            version = "0+unknown"
        globals()["__version__"] = version
        return version
    return _getattr(name)


def __dir__() -> list[str]:
    return sorted({*_dir(), "__version__"})
