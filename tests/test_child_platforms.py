"""Every child process of the test suite runs jax on the CPU, whatever the host's default backend
is: `launch_local` and `call_on_simulated_devices` set ``JAX_PLATFORMS=cpu`` for their children
(through `cpu_child_env`), and a static check holds every ``subprocess`` call in tests/ to an
``env=`` built by that helper."""

import ast
import dataclasses
import json
import os
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from jaxeff.parallel import multiprocess as mp

TESTS = os.path.dirname(os.path.abspath(__file__))
SPAWNERS = {"run", "Popen", "call", "check_call", "check_output"}
HELPER = "cpu_child_env"

_REPORT = textwrap.dedent(
    """
    import json, os
    from jaxeff.parallel.multiprocess import initialize_from_env
    initialize_from_env()
    import jax
    print("PLATFORM " + json.dumps(
        [jax.default_backend(), os.environ["JAX_PLATFORMS"], jax.device_count()]
    ))
    """
)


@pytest.mark.parametrize("inherited", ["", "cuda", "tpu,cpu", None])
def test_cpu_child_env_pins_the_cpu_over_any_inherited_platform(inherited):
    base = {"PATH": "/bin", "XLA_FLAGS": "--xla_foo=1"}
    if inherited is not None:
        base["JAX_PLATFORMS"] = inherited
    env = mp.cpu_child_env(base, XLA_FLAGS=None, SEED=3)
    assert env == {"PATH": "/bin", "SEED": "3", "JAX_PLATFORMS": "cpu"}
    assert base["XLA_FLAGS"] == "--xla_foo=1"  # a copy: the base is left alone
    # extra cannot take the pin off: the helper's name is its promise
    assert mp.cpu_child_env(base, JAX_PLATFORMS="cuda")["JAX_PLATFORMS"] == "cpu"


def test_cpu_child_env_defaults_to_this_process_environment(monkeypatch):
    monkeypatch.setenv("JAXEFF_PROBE", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    env = mp.cpu_child_env()
    assert env["JAXEFF_PROBE"] == "1" and env["JAX_PLATFORMS"] == "cpu"
    assert os.environ["JAX_PLATFORMS"] == "cuda"


@dataclasses.dataclass(frozen=True)
class _NoConfig:
    tag: str = "x"


def _platform(cfg: _NoConfig) -> list:
    import jax

    return [jax.default_backend(), os.environ["JAX_PLATFORMS"], jax.device_count(), cfg.tag]


def _reported(results) -> list:
    (r,) = results
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("PLATFORM ")]
    return json.loads(line[len("PLATFORM ") :])


# "tpu" is the other value: on a host without one, a child that kept it would fail to start jax
@pytest.mark.parametrize("parent, given", [("", "tpu"), ("tpu", "")])
def test_launch_local_and_call_on_simulated_devices_children_run_on_the_cpu(
    monkeypatch, parent, given
):
    monkeypatch.setenv("JAX_PLATFORMS", parent)  # what the children would inherit
    argv = mp.python_argv(_REPORT)
    with ThreadPoolExecutor(3) as pool:  # at once: each child spends ~2 s importing jax
        inherited = pool.submit(
            mp.launch_local, argv, num_processes=1, devices_per_process=2, timeout=120
        )
        env = {**os.environ, "JAX_PLATFORMS": given}
        passed = pool.submit(mp.launch_local, argv, num_processes=1, timeout=120, env=env)
        called = pool.submit(mp.call_on_simulated_devices, _platform, _NoConfig("y"), 3)
    assert _reported(inherited.result()) == ["cpu", "cpu", 2]
    assert _reported(passed.result()) == ["cpu", "cpu", 1]
    assert called.result() == ["cpu", "cpu", 3, "y"]
    assert os.environ["JAX_PLATFORMS"] == parent


def _conftest(request):
    path = os.path.join(TESTS, "conftest.py")
    (module,) = [
        m
        for m in request.config.pluginmanager.get_plugins()
        if os.path.abspath(getattr(m, "__file__", "") or "") == path
    ]
    return module


def test_conftest_accelerator_settings_follow_the_default_backend(request, monkeypatch):
    import jax

    conftest = _conftest(request)
    # decided at import, before jax starts: only on a GPU/TPU host does anything change
    assert (conftest.ACCELERATOR is None) == (jax.default_backend() == "cpu")
    if conftest.ACCELERATOR is None:
        assert jax.config.jax_default_matmul_precision is None
    else:
        assert jax.config.jax_default_matmul_precision == "highest"
        assert conftest.DETERMINISTIC_FLAG in os.environ["XLA_FLAGS"].split()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert conftest._accelerator_platform() is None
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert conftest._accelerator_platform() == "cuda"


# --- the static check ------------------------------------------------------------------------


def _is_helper_call(node) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (isinstance(f, ast.Name) and f.id == HELPER) or (
        isinstance(f, ast.Attribute) and f.attr == HELPER
    )


def _spawn_calls(tree):
    """``subprocess.X(...)`` calls (X in SPAWNERS), also through ``from subprocess import X``
    or ``import subprocess as sp``."""
    modules, names = {"subprocess"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name == "subprocess"}
        elif isinstance(node, ast.ImportFrom) and node.module == "subprocess":
            names |= {a.asname or a.name for a in node.names if a.name in SPAWNERS}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in SPAWNERS:
            if isinstance(f.value, ast.Name) and f.value.id in modules:
                yield node
        elif isinstance(f, ast.Name) and f.id in names:
            yield node


def _assignments(scope, name):
    """The values assigned to ``name`` in ``scope`` (a function's body, or a module's top level
    when ``scope`` is a Module)."""
    nodes = ast.walk(scope) if not isinstance(scope, ast.Module) else scope.body
    values = []
    for node in nodes:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                values.append(node.value)
    return values


def unpinned_spawns(tree: ast.Module, filename: str = "<test>") -> list[str]:
    """``file:line`` of each subprocess call in ``tree`` whose ``env=`` is not
    ``cpu_child_env(...)`` or a name bound (in its function, else at module level) only to it."""
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    bad = []
    for call in _spawn_calls(tree):
        env = next((k.value for k in call.keywords if k.arg == "env"), None)
        ok = _is_helper_call(env)
        if isinstance(env, ast.Name):
            scope = call
            values = []
            while not values and scope in parents:
                scope = parents[scope]
                if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Module):
                    values = _assignments(scope, env.id)
            ok = bool(values) and all(_is_helper_call(v) for v in values)
        if not ok:
            bad.append(f"{filename}:{call.lineno}")
    return bad


def test_every_subprocess_call_in_the_tests_pins_the_cpu():
    bad, seen = [], 0
    for folder, _, files in os.walk(TESTS):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), path)
                seen += len(list(_spawn_calls(tree)))
                bad += unpinned_spawns(tree, os.path.relpath(path, TESTS))
    assert seen >= 10  # the check sees the suite's call sites
    assert not bad, (
        "these subprocess calls must pass env=cpu_child_env(...) "
        f"(jaxeff.parallel.multiprocess) so that the child runs jax on the CPU: {bad}"
    )


def test_the_static_check_catches_a_call_without_the_helper():
    bad = textwrap.dedent(
        """
        import os, subprocess, sys
        from subprocess import Popen as P
        import subprocess as sp
        subprocess.run([sys.executable])
        subprocess.run([sys.executable], env=os.environ)
        sp.check_output(["x"], env={**os.environ, "JAX_PLATFORMS": "cpu"})
        def f():
            env = dict(os.environ)
            P(["x"], env=env)
        def g():
            env = cpu_child_env()
            env = dict(os.environ)
            subprocess.Popen(["x"], env=env)
        """
    )
    assert unpinned_spawns(ast.parse(bad)) == [f"<test>:{n}" for n in (5, 6, 7, 10, 14)]
    good = textwrap.dedent(
        """
        import subprocess, sys
        from jaxeff.parallel import multiprocess as mp
        from jaxeff.parallel.multiprocess import cpu_child_env
        ENV = cpu_child_env()
        subprocess.run([sys.executable], env=cpu_child_env(PYTHONPATH="x"))
        subprocess.run([sys.executable], env=mp.cpu_child_env())
        subprocess.run([sys.executable], env=ENV)
        def f():
            env = cpu_child_env(SEED="1")
            return subprocess.Popen(["x"], env=env)
        """
    )
    assert unpinned_spawns(ast.parse(good)) == []
