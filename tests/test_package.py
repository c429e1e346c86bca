"""The package fronts: ``jaxeff.__version__``, lazy subpackages and re-exports (``import jaxeff``
and ``import jaxeff.nn.config`` import no jax), `jaxeff.optim` as one optax-like namespace, and
experiments and notebooks importing only public names."""

import ast
import glob
import importlib
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

import jaxeff
from jaxeff.parallel.multiprocess import cpu_child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRONTS = ("jaxeff", "jaxeff.data", "jaxeff.llm", "jaxeff.nn", "jaxeff.optim")


def test_version_is_a_string():
    assert isinstance(jaxeff.__version__, str) and jaxeff.__version__
    assert "__version__" in jaxeff.__all__


def test_version_falls_back_when_not_installed(monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    assert jaxeff.__version__  # cached now, so monkeypatch restores it afterwards
    monkeypatch.delattr(jaxeff, "__version__")
    monkeypatch.setattr(metadata, "version", not_installed)
    assert jaxeff.__version__ == "0+unknown"


def test_attach_rejects_a_name_that_is_both_a_submodule_and_an_attribute():
    from jaxeff._lazy import attach

    with pytest.raises(ValueError, match="both submodules and attributes"):
        attach("pkg", submodules=("came",), attrs={"came": "_came"})


def test_import_does_not_import_jax():
    code = (
        "import sys\n"
        "import jaxeff, jaxeff.nn, jaxeff.nn.config, jaxeff.data, jaxeff.llm, jaxeff.optim\n"
        "from jaxeff import nn, optim, train, data, parallel, infer, evals\n"
        "from jaxeff.nn import TransformerConfig, MoEConfig, ModConfig, RopeScaling\n"
        "from jaxeff.nn.config import VideoLLMConfig\n"
        "from jaxeff.train.recipe import LMConfig, OptimConfig\n"
        'LMConfig(), OptimConfig(name="came"), VideoLLMConfig()\n'
        "TransformerConfig()\n"
        "jaxeff.__version__, dir(jaxeff), dir(jaxeff.nn), dir(jaxeff.optim)\n"
        "heavy = sorted(m for m in ('jax', 'flax', 'optax') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=cpu_child_env(),
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_from_jaxeff_import_subpackages():
    from jaxeff import data, nn, optim, train

    for module in (nn, optim, train, data):
        assert isinstance(module, types.ModuleType)
    assert nn is sys.modules["jaxeff.nn"] and optim is sys.modules["jaxeff.optim"]
    for name in jaxeff.__all__:
        if name != "__version__":
            assert getattr(jaxeff, name) is importlib.import_module(f"jaxeff.{name}")


@pytest.mark.parametrize("front", FRONTS)
def test_every_exported_name_resolves_and_is_listed(front):
    module = importlib.import_module(front)
    assert module.__all__ == sorted(module.__all__, key=lambda n: (n != "__version__", n))
    assert set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018


def test_data_names_keep_their_modules():
    from jaxeff.data import CORPORA, make_loader, packing

    assert make_loader is packing.make_loader
    assert CORPORA is importlib.import_module("jaxeff.data.corpora").CORPORA


def _shapes(tree):
    import jax

    return jax.tree.map(lambda x: x.shape, tree)


def test_optim_is_one_optax_like_namespace():
    import jax.numpy as jnp
    import optax

    import jaxeff.optim

    # `came` is the optimizer, not a module (the modules behind the front are private)
    assert not isinstance(jaxeff.optim.came, types.ModuleType)
    assert callable(jaxeff.optim.came) and callable(jaxeff.optim.scale_by_came)
    assert jaxeff.optim.came is importlib.import_module("jaxeff.optim._came").came
    for name in ("came", "helen", "sam", "asam", "gsam", "SAMState", "HelenState"):
        assert name in jaxeff.optim.__all__

    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    grads = {"w": jnp.full((4, 3), 0.1), "b": jnp.full(3, -0.2)}
    for tx in (
        optax.chain(jaxeff.optim.came(1e-3)),
        optax.chain(optax.clip_by_global_norm(1.0), jaxeff.optim.scale_by_came(), optax.scale(-1)),
    ):
        state = tx.init(params)
        updates, state = tx.update(grads, state, params)
        assert _shapes(updates) == _shapes(params)
    assert isinstance(jaxeff.optim.scale_by_came().init(params), jaxeff.optim.ScaleByCameState)


def _private_imports_in_source(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxeff"):
            parts = node.module.split(".")
            found += [node.module for p in parts if p.startswith("_")]
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [
                a.name
                for a in node.names
                if a.name.startswith("jaxeff") and any(p.startswith("_") for p in a.name.split("."))
            ]
    return found


def test_experiments_and_notebooks_import_only_public_names():
    private = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
        with open(path) as f:
            hits = _private_imports_in_source(f.read())
        if hits:
            private[os.path.relpath(path, ROOT)] = hits
    pattern = re.compile(r"\bjaxeff(\.\w+)*\._\w+|from jaxeff\S* import .*\b_\w+")
    for path in sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))):
        with open(path) as f:
            cells = json.load(f)["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                hits = [m.group(0) for m in pattern.finditer("".join(cell["source"]))]
                if hits:
                    private.setdefault(os.path.relpath(path, ROOT), []).extend(hits)
    assert not private, private


def _project() -> dict:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _requirement_name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_level_modules() -> set[str]:
    found = set()
    for folder in ("jaxeff", "kernels", "experiments"):
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    found |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.add(node.module.split(".")[0])
    return found


def test_every_core_dependency_is_imported_by_the_package():
    from importlib import metadata

    provides: dict[str, set[str]] = {}  # distribution -> its top-level modules
    for module, dists in metadata.packages_distributions().items():
        for dist in dists:
            provides.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    imported = _imported_top_level_modules()
    unused = [
        name
        for name in map(_requirement_name, _project()["dependencies"])
        if name in provides and not provides[name] & imported
    ]
    assert not unused, f"core dependencies nothing in jaxeff imports: {unused}"


def test_optional_packages_are_extras_and_accelerators_stay_out_of_all():
    project = _project()
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    assert not core & {"faiss-cpu", "sacrebleu", "einops"}, core
    assert extras["retrieval"] == ["faiss-cpu>=1.8"]
    assert extras["translation"] == ["sacrebleu>=2.4"]
    assert extras["cuda"] == ["jax[cuda12]>=0.10.2"] and extras["tpu"] == ["jax[tpu]>=0.10.2"]
    (everything,) = extras["all"]
    in_all = set(re.fullmatch(r"jaxeff\[(.*)\]", everything).group(1).split(","))
    assert in_all == set(extras) - {"all", "cuda", "tpu"}


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    from jaxeff.data.infogrowth import InfoGrowth
    from jaxeff.experiments import inference
    from jaxeff.infer.knnmt import Datastore

    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(ValueError, match=r"needs faiss: pip install 'jaxeff\[retrieval\]'$"):
        InfoGrowth((4, 4))
    with pytest.raises(ValueError, match=r"needs faiss: pip install 'jaxeff\[retrieval\]'$"):
        Datastore(np.ones((3, 2)), [0, 1, 2])
    with pytest.raises(ValueError, match=r"needs sacrebleu: pip install 'jaxeff\[translation\]'$"):
        inference._corpus_scores(["a"], ["a"])
