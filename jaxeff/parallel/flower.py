"""The rounds of `jaxeff.parallel.federated` over Flower: a server and client processes on
localhost talking real gRPC.

Transport: flwr 1.41's ``flwr.server.start_server`` / ``flwr.client.start_client`` with the
``grpc-bidi`` transport. Both are marked deprecated since flwr 1.13 in favour of the
SuperLink / SuperNode / ``flwr run`` deployment (which packages the code as a Flower App and
runs it through separate long-lived daemons); the legacy pair still ships in 1.41, needs no
network beyond localhost, and lets this module start and stop every process itself.

* The task (model, loss, optimizers, data) is built in every process from the same factory and
  config (``"module:function"`` plus JSON kwargs), so all processes agree on the initial
  model and on each client's batches: a Flower run equals the mesh run with the same seed.
* Clients (`JaxClient`) keep their inner optimizer state across rounds and run exactly
  `federated.client_round`; they send their final parameters and their token count.
* The server (`JaxStrategy`) checks every update (client id, number of arrays, shapes, dtypes,
  finite values) and rejects, logs and skips a bad one; failed clients (killed, timed out) are
  logged and the round completes with the others (at least ``min_fit_clients``). It averages
  with `federated.weighted_delta`, steps the outer Optax optimizer, evaluates, and saves the
  global model and outer state with orbax every round; a new server on the same ``workdir``
  resumes from the newest checkpoint.
* `launch` picks a free port, starts the processes in their own process groups, waits with a
  timeout and kills every child it started on exit.

Reference: Beutel et al., Flower: A Friendly Federated Learning Research Framework, 2020.
https://arxiv.org/abs/2007.14390
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

LOG = logging.getLogger("jaxeff.flower")
EVENTS = "server_events.jsonl"


def load_task(spec: dict):
    """Builds the task of ``spec = {"factory": "module:function", "kwargs": {...}}``."""
    factory = spec.get("factory", "")
    if ":" not in factory:
        raise ValueError(f"spec.factory must be 'module:function', got {factory!r}")
    module, name = factory.split(":", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("kwargs", {}))


def validate_update(arrays: list, reference: list) -> str | None:
    """Why an update cannot be averaged in (None if it can): structure, shapes, dtypes,
    non-finite values."""
    if len(arrays) != len(reference):
        return f"structure: {len(arrays)} arrays, expected {len(reference)}"
    for i, (a, r) in enumerate(zip(arrays, reference, strict=True)):
        if tuple(a.shape) != tuple(r.shape):
            return f"array {i}: shape {tuple(a.shape)}, expected {tuple(r.shape)}"
        if a.dtype != r.dtype:
            return f"array {i}: dtype {a.dtype}, expected {r.dtype}"
        if not np.all(np.isfinite(a)):
            return f"array {i}: non-finite values"
    return None


def _strategy_base():
    from flwr.server.strategy import Strategy

    return Strategy


def make_strategy(task, workdir: str, min_fit_clients: int, total_rounds: int):
    """A `JaxStrategy` (built lazily so that importing this module does not import flwr)."""

    class JaxStrategy(_strategy_base()):
        """Server side of the federated rounds; see the module docstring."""

        def __init__(self):
            import jax

            from jaxeff.parallel import federated as fed
            from jaxeff.train.checkpoint import Checkpointer

            self.task = task
            self.min_fit_clients = min_fit_clients
            self.workdir = workdir
            os.makedirs(workdir, exist_ok=True)
            self.treedef = jax.tree.structure(task.params)
            server, _ = fed.init(task.params, task.inner_tx, task.outer_tx, 1)
            self.ckpt = Checkpointer(
                os.path.join(workdir, "checkpoints"), every=1, keep=2, async_save=False
            )
            self.done = 0
            if self.ckpt.latest_step() is not None:
                server, _, meta = self.ckpt.restore(server)
                self.done = int(meta["round"])
                LOG.info("resuming from the checkpoint of round %d", self.done)
            self.server = server
            self.reference = [np.asarray(x) for x in jax.tree.leaves(server.params)]
            self.total_rounds = total_rounds
            self.started = False

            def aggregate(params, outer_state, finals, weights):
                start = jax.tree.map(
                    lambda g, f: jax.numpy.broadcast_to(g, f.shape), params, finals
                )
                masks = fed.full_masks(params, weights.shape[0])
                delta, _ = fed.weighted_delta(start, finals, masks, weights)
                return fed.outer_step(task.outer_tx, params, outer_state, delta)

            self._aggregate = jax.jit(aggregate)

        def _event(self, record: dict) -> None:
            with open(os.path.join(self.workdir, EVENTS), "a") as f:
                f.write(json.dumps(record) + "\n")

        def initialize_parameters(self, client_manager):
            from flwr.common import ndarrays_to_parameters

            return ndarrays_to_parameters(self.reference)

        def configure_fit(self, server_round, parameters, client_manager):
            from flwr.common import FitIns, ndarrays_to_parameters

            # the first round of a server waits for every client, later ones for the minimum
            want = self.min_fit_clients if self.started else self.task.num_clients
            self.started = True
            if not client_manager.wait_for(want, timeout=120):
                LOG.warning("only %d of %d clients connected", client_manager.num_available(), want)
            clients = client_manager.all().values()
            global_round = self.done  # rounds completed so far = this round's index
            params = ndarrays_to_parameters([np.asarray(x) for x in self._leaves()])
            ins = FitIns(params, {"round": global_round})
            return [(c, ins) for c in clients]

        def _leaves(self):
            import jax

            return jax.tree.leaves(self.server.params)

        def aggregate_fit(self, server_round, results, failures):
            import jax
            from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

            r = self.done
            accepted, rejected = {}, []
            for _, res in results:
                cid = res.metrics.get("client_id")
                arrays = parameters_to_ndarrays(res.parameters)
                reason = validate_update(arrays, self.reference)
                if not isinstance(cid, int) or not 0 <= cid < self.task.num_clients:
                    reason = f"client_id {cid!r} is not in [0, {self.task.num_clients})"
                elif cid in accepted:
                    reason = f"client_id {cid} sent twice"
                if reason is not None:
                    LOG.warning("round %d: rejected the update of client %s: %s", r, cid, reason)
                    rejected.append({"client": cid, "reason": reason})
                    continue
                accepted[cid] = (arrays, float(res.num_examples))
            failed = [repr(f if isinstance(f, BaseException) else f[1].status) for f in failures]
            for f in failed:
                LOG.warning("round %d: a client failed (%s); continuing with the others", r, f)
            record = {
                "round": r,
                "accepted": sorted(accepted),
                "rejected": rejected,
                "failed": len(failures),
                "failures": failed[:5],
            }
            if len(accepted) < self.min_fit_clients:
                LOG.warning(
                    "round %d: only %d valid updates (< %d): global model unchanged, retried "
                    "next round",
                    r,
                    len(accepted),
                    self.min_fit_clients,
                )
                record["status"] = "retried"
                self._event(record)
                return None, {}
            ids = sorted(accepted)
            finals = [
                np.stack([accepted[c][0][i] for c in ids]) for i in range(len(self.reference))
            ]
            weights = np.asarray([accepted[c][1] for c in ids], np.float32)
            params, outer = self._aggregate(
                self.server.params,
                self.server.outer_state,
                jax.tree.unflatten(self.treedef, finals),
                weights,
            )
            self.server = type(self.server)(params, outer, self.server.round + 1)
            self.done = r + 1
            if len(ids) < self.task.num_clients:
                LOG.warning(
                    "round %d completed with %d of %d clients", r, len(ids), self.task.num_clients
                )
            record["status"] = "ok"
            if self.task.eval_fn is not None:
                record.update({k: float(v) for k, v in self.task.eval_fn(params).items()})
            self.ckpt.save(self.done, self.server, data={}, meta={"round": self.done}, force=True)
            self._event(record)
            return ndarrays_to_parameters([np.asarray(x) for x in self._leaves()]), {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return JaxStrategy()


def make_client(task, client_id: int, faults: dict | None = None):
    """A Flower ``NumPyClient`` that runs `federated.client_round` for silo ``client_id``.

    ``faults`` (for tests): ``{"kill_round": r}`` kills the process with SIGKILL after it has
    received round ``r``; ``{"corrupt_round": r, "corrupt": "nan" | "shape"}`` sends a
    non-finite or wrongly shaped update in round ``r``.
    """
    import jax
    import jax.numpy as jnp
    from flwr.client import NumPyClient

    from jaxeff.parallel import federated as fed

    faults = faults or {}
    treedef = jax.tree.structure(task.params)
    masks = jax.tree.map(lambda x: jnp.ones((1,) * jnp.ndim(x), jnp.float32), task.params)

    @jax.jit
    def train(global_params, local_params, opt_state, batches):
        return fed.client_round(
            task.loss_fn, task.inner_tx, global_params, local_params, opt_state, batches, masks
        )

    class JaxClient(NumPyClient):
        def __init__(self):
            self.local = task.params
            self.opt_state = task.inner_tx.init(task.params)

        def get_parameters(self, config):
            return [np.asarray(x) for x in jax.tree.leaves(self.local)]

        def fit(self, parameters, config):
            r = int(config["round"])
            if faults.get("kill_round") == r:
                LOG.warning("client %d: killed in round %d (fault injection)", client_id, r)
                os.kill(os.getpid(), signal.SIGKILL)
            global_params = jax.tree.unflatten(treedef, [jnp.asarray(p) for p in parameters])
            batches = task.client_batches(client_id, r)
            _, final, self.opt_state, losses = train(
                global_params, self.local, self.opt_state, batches
            )
            self.local = final
            arrays = [np.asarray(x) for x in jax.tree.leaves(final)]
            if faults.get("corrupt_round") == r:
                if faults.get("corrupt") == "shape":
                    arrays = arrays[:-1]
                else:
                    arrays[0] = np.full_like(arrays[0], np.nan)
            stacked = jax.tree.map(lambda x: np.asarray(x)[None], batches)
            weight = float(fed.client_weights(stacked, task.weight_key)[0])
            # Flower carries the weight as an integer count (tokens, examples); the server
            # averages by it, so a fractional weight is rounded (weights are counts in practice)
            return (
                arrays,
                max(1, round(weight)),
                {"client_id": client_id, "loss": float(jnp.mean(losses))},
            )

    return JaxClient()


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(address: str, timeout: float) -> None:
    """Blocks until ``host:port`` accepts TCP connections; TimeoutError after ``timeout`` s."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no server listening on {address} after {timeout} s") from None
            time.sleep(0.2)


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def launch(
    spec: dict,
    workdir: str,
    num_clients: int,
    rounds: int,
    *,
    min_fit_clients: int | None = None,
    round_timeout: float = 120.0,
    timeout: float = 600.0,
    faults: dict[int, dict] | None = None,
) -> list[dict]:
    """Runs a server and ``num_clients`` client processes on localhost until ``rounds`` rounds
    are done (resuming from ``workdir``'s checkpoints); returns the server's per-round events.

    Every process is started in its own process group and killed when the run ends, fails or
    exceeds ``timeout`` seconds. Logs go to ``workdir/logs/``.
    """
    if num_clients < 1 or rounds < 1:
        raise ValueError(f"num_clients={num_clients} and rounds={rounds} must both be >= 1")
    min_fit_clients = min_fit_clients or max(1, num_clients - 1)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    spec_path = os.path.join(workdir, "spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    address = f"127.0.0.1:{free_port()}"
    from jaxeff.parallel.multiprocess import cpu_child_env

    # one CPU device per process: N local clients on one accelerator would each preallocate it
    env = cpu_child_env(FLWR_TELEMETRY_ENABLED="0", XLA_FLAGS=None)
    common = ["--spec", spec_path, "--address", address, "--workdir", workdir]
    procs = []

    def start(args, name):
        log = open(os.path.join(workdir, "logs", f"{name}.log"), "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "jaxeff.parallel.flower", *args, *common]
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        procs.append(proc)
        return proc

    try:
        server = start(
            [
                "server",
                f"--rounds={rounds}",
                f"--min-fit-clients={min_fit_clients}",
                f"--round-timeout={round_timeout}",
            ],
            "server",
        )
        for c in range(num_clients):
            fault = json.dumps((faults or {}).get(c, {}))
            start(["client", f"--client-id={c}", f"--faults={fault}"], f"client{c}")
        deadline = time.monotonic() + timeout
        while server.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Flower run in {workdir} exceeded {timeout} s; logs in logs/")
            time.sleep(0.2)
        if server.returncode != 0:
            with open(os.path.join(workdir, "logs", "server.log")) as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"Flower server exited with {server.returncode}:\n{tail}")
        for proc in procs[1:]:  # clients leave when the server disconnects them
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=15)
    finally:
        for proc in procs:
            _kill_group(proc)
    return read_events(workdir)


def read_events(workdir: str) -> list[dict]:
    path = os.path.join(workdir, EVENTS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _serve(args) -> None:
    import flwr

    with open(args.spec) as f:
        task = load_task(json.load(f))
    strategy = make_strategy(task, args.workdir, args.min_fit_clients, args.rounds)
    remaining = args.rounds - strategy.done
    if remaining <= 0:
        LOG.info("all %d rounds already done", args.rounds)
        return
    flwr.server.start_server(
        server_address=args.address,
        config=flwr.server.ServerConfig(num_rounds=remaining, round_timeout=args.round_timeout),
        strategy=strategy,
    )
    strategy.ckpt.close()


def _client(args) -> None:
    import flwr

    with open(args.spec) as f:
        task = load_task(json.load(f))
    client = make_client(task, args.client_id, json.loads(args.faults))
    # grpc-bidi gives up at once on a refused connection: wait for the server to listen
    wait_for_port(args.address, timeout=120)
    flwr.client.start_client(
        server_address=args.address, client=client.to_client(), insecure=True, max_wait_time=120
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxeff.parallel.flower")
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--spec", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--min-fit-clients", type=int, default=1)
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--client-id", type=int, default=0)
    parser.add_argument("--faults", default="{}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    (_serve if args.role == "server" else _client)(args)


if __name__ == "__main__":
    main()
