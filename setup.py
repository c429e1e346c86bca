"""Package layout: top-level `kernels/` and `experiments/` install as `jaxeff.kernels` and
`jaxeff.experiments` (the bare name `kernels` is taken on PyPI). Metadata: pyproject.toml."""

from setuptools import find_packages, setup

ROOTS = {"jaxeff": "jaxeff", "jaxeff.kernels": "kernels", "jaxeff.experiments": "experiments"}


def _packages():
    found = []
    for name, folder in ROOTS.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=_packages(), package_dir=ROOTS)
