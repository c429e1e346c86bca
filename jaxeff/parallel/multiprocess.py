"""JAX's multi-controller runtime on one machine: launch N local processes, each with D CPU
devices, joined by ``jax.distributed.initialize`` with gloo CPU collectives.

On a GPU or TPU pod the same program runs unchanged: one process per host (or per GPU), started
by the cluster's launcher (SLURM, ``mpirun``, a Kubernetes job); ``jax.distributed.initialize()``
then needs no arguments, because JAX reads the coordinator and process ids from the cluster
environment. Locally, :func:`launch_local` plays the launcher's role and passes them through
environment variables that :func:`initialize_from_env` reads.

Example (a script that every process runs)::

    from jaxeff.parallel.multiprocess import initialize_from_env
    initialize_from_env()          # before any other jax call
    import jax
    mesh = jax.make_mesh((jax.device_count(),), ("seq",))   # spans every process

and the launcher::

    results = launch_local(["python", "script.py"], num_processes=2, devices_per_process=4)
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

ENV_COORDINATOR = "JAXEFF_COORDINATOR"
ENV_NUM_PROCESSES = "JAXEFF_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXEFF_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAXEFF_LOCAL_DEVICES"
# on a GPU/TPU pod: JAXEFF_DISTRIBUTED=1 calls jax.distributed.initialize() with no arguments
ENV_AUTO = "JAXEFF_DISTRIBUTED"
_JOINED: tuple[int, int] | None = None


# XLA:CPU aborts a program whose simulated devices wait more than 40 s for each other at a
# collective; on a loaded 2-core machine 8 device threads can fall that far apart.
COLLECTIVE_TIMEOUT_FLAGS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
    "--xla_cpu_collective_timeout_seconds=600"
)


def simulated_devices_xla_flags(n: int) -> str:
    """``XLA_FLAGS`` for ``n`` simulated CPU devices with patient collectives; set it before
    jax is imported."""
    return f"--xla_force_host_platform_device_count={int(n)} {COLLECTIVE_TIMEOUT_FLAGS}"


def cpu_child_env(base: Mapping[str, str] | None = None, **extra: str | None) -> dict[str, str]:
    """The environment of a child process that must run jax on the CPU: ``base`` (default: this
    process's ``os.environ``) updated with ``extra`` (a ``None`` value removes that variable),
    then ``JAX_PLATFORMS=cpu``.

    A child that simulates CPU devices (``--xla_force_host_platform_device_count``) or joins gloo
    CPU collectives must not pick the host's default backend: on a GPU or TPU host an unset or
    inherited ``JAX_PLATFORMS`` would put it on the accelerator (or fail to start it).
    """
    env = dict(os.environ if base is None else base)
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    env["JAX_PLATFORMS"] = "cpu"
    return env


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize_from_env() -> tuple[int, int]:
    """Join the job described by the ``JAXEFF_*`` variables; returns ``(process_id, count)``.

    Must run before the first jax computation of the process. Sets the host device count
    (``JAXEFF_LOCAL_DEVICES``, CPU only) and gloo CPU collectives, then calls
    ``jax.distributed.initialize(coordinator, num_processes, process_id)``. Without the variables
    it does nothing and returns ``(0, 1)``: the same script runs as a single process. On a
    cluster, ``JAXEFF_DISTRIBUTED=1`` calls ``jax.distributed.initialize()`` without arguments
    (JAX reads SLURM, TPU pod, Open MPI or GKE variables). A second call returns the first's
    result.
    """
    global _JOINED
    if _JOINED is not None:  # a second call (e.g. the CLI, then an experiment) is a no-op
        return _JOINED
    if os.environ.get(ENV_AUTO, "") == "1":
        import jax

        jax.distributed.initialize()  # the cluster (SLURM, TPU, Open MPI, GKE) names everything
        _JOINED = (jax.process_index(), jax.process_count())
        return _JOINED
    if ENV_COORDINATOR not in os.environ:
        return 0, 1
    try:
        num = int(os.environ[ENV_NUM_PROCESSES])
        pid = int(os.environ[ENV_PROCESS_ID])
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"{ENV_COORDINATOR} is set but {ENV_NUM_PROCESSES}/{ENV_PROCESS_ID} are missing or "
            f"not integers ({e}); set all three"
        ) from None
    if not 0 <= pid < num:
        raise ValueError(f"{ENV_PROCESS_ID} = {pid} must be in [0, {ENV_NUM_PROCESSES} = {num})")
    local = os.environ.get(ENV_LOCAL_DEVICES)
    if local:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} {simulated_devices_xla_flags(int(local))}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ[ENV_COORDINATOR], num_processes=num, process_id=pid)
    _JOINED = (pid, num)
    return _JOINED


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    process_id: int
    returncode: int
    stdout: str
    stderr: str


def launch_local(
    argv: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int = 1,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> list[ProcessResult]:
    """Run ``argv`` as ``num_processes`` processes of one JAX job on localhost and wait for all.

    Each process gets the ``JAXEFF_*`` variables (a fresh coordinator port, its id, the device
    count) for :func:`initialize_from_env`, and ``JAX_PLATFORMS=cpu`` (:func:`cpu_child_env`):
    the devices are simulated CPU devices on any host. If one process fails or the timeout
    passes, the others are killed (a distributed job cannot finish without every member; a
    killed process has a negative return code). Returns each process's exit code and output, in
    process order.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"num_processes = {num_processes} and devices_per_process = {devices_per_process} "
            "must both be >= 1"
        )
    # the device count is set per process by initialize_from_env
    base = cpu_child_env(env, XLA_FLAGS=None)
    base[ENV_COORDINATOR] = f"localhost:{free_port()}"
    base[ENV_NUM_PROCESSES] = str(num_processes)
    base[ENV_LOCAL_DEVICES] = str(devices_per_process)
    with tempfile.TemporaryDirectory() as logs:
        procs, files = [], []
        for pid in range(num_processes):
            out = open(os.path.join(logs, f"{pid}.out"), "w+")  # noqa: SIM115
            err = open(os.path.join(logs, f"{pid}.err"), "w+")  # noqa: SIM115
            files.append((out, err))
            penv = dict(base, **{ENV_PROCESS_ID: str(pid)})
            procs.append(subprocess.Popen(list(argv), env=penv, stdout=out, stderr=err, text=True))
        deadline = time.monotonic() + timeout
        try:
            while True:
                codes = [p.poll() for p in procs]  # every process, no short-circuit
                if all(c is not None for c in codes):
                    break
                if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        results = []
        for pid, (p, (out, err)) in enumerate(zip(procs, files, strict=True)):
            out.seek(0)
            err.seek(0)
            results.append(ProcessResult(pid, p.returncode, out.read(), err.read()))
            out.close()
            err.close()
    return results


RESULT_PREFIX = "RESULT "

_CHILD_SCRIPT = """\
import importlib, json, os, sys
os.environ["XLA_FLAGS"] = sys.argv[1]
from jaxeff import config

def load(path):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)

cfg = config.from_dict(load(sys.argv[3]), json.loads(sys.argv[4]))
result = load(sys.argv[2])(cfg, *json.loads(sys.argv[5]))
print("RESULT " + json.dumps(result), flush=True)
"""


def _qualified(obj) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def child_xla_flags(devices: int, inherited: str | None = None) -> str:
    """This process's ``XLA_FLAGS`` with its device count replaced by ``devices`` simulated
    CPU devices (other flags kept)."""
    flags = (os.environ.get("XLA_FLAGS", "") if inherited is None else inherited).split()
    kept = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join([*kept, simulated_devices_xla_flags(devices)])


def call_on_simulated_devices(fn, cfg, devices: int, *args):
    """``fn(cfg, *args)`` in a fresh Python that simulates ``devices`` CPU devices, returning
    its JSON-serialisable result.

    XLA reads the device count once, when jax starts, so an experiment that needs 8 devices in
    a process that has fewer runs there, on the CPU also on a GPU host (``JAX_PLATFORMS=cpu``,
    :func:`cpu_child_env`). ``fn`` must be a module-level function, ``cfg`` a `jaxeff.config`
    dataclass (it travels as JSON through `jaxeff.config.to_dict`/`from_dict`) and ``args``
    JSON values. The child's stderr (progress bars, logs) passes through.
    """
    from jaxeff import config as config_lib

    argv = [
        *python_argv(_CHILD_SCRIPT),
        child_xla_flags(devices),
        _qualified(fn),
        _qualified(type(cfg)),
        json.dumps(config_lib.to_dict(cfg)),
        json.dumps(list(args)),
    ]
    env = cpu_child_env(PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run(argv, stdout=subprocess.PIPE, text=True, env=env)
    lines = [x for x in out.stdout.splitlines() if x.startswith(RESULT_PREFIX)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(
            f"{fn.__qualname__} on {devices} simulated devices failed (exit {out.returncode}); "
            "its error is printed above"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def python_argv(script: str) -> list[str]:
    """``argv`` that runs the Python source ``script`` with this interpreter."""
    return [sys.executable, "-c", script]
