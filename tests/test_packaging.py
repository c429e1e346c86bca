"""kernels/ and experiments/ install as jaxeff.kernels and jaxeff.experiments, both in a regular
(wheel) install and in the editable install that `make test` makes."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from jaxeff.parallel.multiprocess import cpu_child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_editable_install_maps_the_top_level_folders():
    import jaxeff.experiments
    import jaxeff.kernels

    assert os.path.samefile(
        os.path.dirname(jaxeff.experiments.__file__), os.path.join(ROOT, "experiments")
    )
    assert os.path.samefile(os.path.dirname(jaxeff.kernels.__file__), os.path.join(ROOT, "kernels"))


def test_wheel_contains_the_mapped_packages_and_imports_from_them(tmp_path):
    # build from a copy: setuptools leaves build/ in the source tree, and stale files there
    # would end up in later wheels
    src = tmp_path / "src"
    for name in ("jaxeff", "kernels", "experiments"):
        shutil.copytree(
            os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_child_env(),
    )
    if build.returncode != 0:
        pytest.fail(build.stderr[-2000:])
    (wheel,) = (tmp_path / "dist").glob("jaxeff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "jaxeff/experiments/lm.py" in names
    assert "jaxeff/kernels/__init__.py" in names
    assert not any(n.startswith(("experiments/", "kernels/", "tests/")) for n in names)
    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=cpu_child_env(),
    )
    assert install.returncode == 0, install.stderr[-2000:]
    code = (
        "import jaxeff.experiments.lm as m, jaxeff.kernels as k;"
        "print(m.__file__); print(k.__file__); print(sorted(m.EXPERIMENTS))"
    )
    env = cpu_child_env(PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target))
    assert lines[2] == "['lm', 'lm-bench']"
