"""Flower transport: update validation, a killed client and a bad update in a real gRPC run on
localhost, and resuming the server from its orbax checkpoint.

(The clean Flower run against the mesh run is tests/experiments/test_federated.py.)"""

import os

import numpy as np
import pytest

from jaxeff.parallel import flower

REF = [np.zeros((2, 3), np.float32), np.zeros(4, np.float32)]


def test_validate_update_names_what_is_wrong():
    assert flower.validate_update([x + 1 for x in REF], REF) is None
    assert "structure: 1 arrays, expected 2" in flower.validate_update(REF[:1], REF)
    assert "shape (3, 2)" in flower.validate_update([np.zeros((3, 2), np.float32), REF[1]], REF)
    assert "dtype float64" in flower.validate_update([REF[0], np.zeros(4)], REF)
    bad = [REF[0], np.array([0, np.inf, 0, 0], np.float32)]
    assert "array 1: non-finite" in flower.validate_update(bad, REF)
    with pytest.raises(ValueError, match="module:function"):
        flower.load_task({"factory": "nope"})


SPEC = {
    "factory": "jaxeff.experiments.federated:photon_task",
    "kwargs": {"method": "photon", "preset": "smoke", "overrides": {"rounds": 3}},
}


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """3 clients, 3 rounds: client 1 sends NaNs in round 0, client 2 is killed (SIGKILL) after
    receiving round 1; at least 2 valid updates are needed per round."""
    workdir = str(tmp_path_factory.mktemp("flower"))
    faults = {1: {"corrupt_round": 0, "corrupt": "nan"}, 2: {"kill_round": 1}}
    events = flower.launch(
        SPEC, workdir, 3, 3, min_fit_clients=2, round_timeout=120, timeout=400, faults=faults
    )
    return workdir, events


def test_bad_update_is_rejected_and_a_killed_client_does_not_stop_training(faulty_run):
    workdir, events = faulty_run
    assert [e["round"] for e in events] == [0, 1, 2]
    assert all(e["status"] == "ok" for e in events)
    r0, r1, r2 = events
    assert r0["accepted"] == [0, 2]
    assert r0["rejected"] == [{"client": 1, "reason": "array 0: non-finite values"}]
    assert r1["accepted"] == [0, 1] and r1["failed"] == 1
    assert r2["accepted"] == [0, 1] and r2["failed"] == 0
    assert all(np.isfinite(e["ppl"]) for e in events)
    with open(os.path.join(workdir, "logs", "server.log")) as f:
        log = f.read()
    assert "rejected the update of client 1: array 0: non-finite values" in log
    assert "round 1 completed with 2 of 3 clients" in log


def test_server_resumes_from_its_checkpoint(faulty_run):
    import jax

    from jaxeff.parallel import federated as fed
    from jaxeff.train.checkpoint import Checkpointer

    workdir, _ = faulty_run
    task = flower.load_task(SPEC)
    strategy = flower.make_strategy(task, workdir, min_fit_clients=2, total_rounds=4)
    try:
        assert strategy.done == 3
        server0, _ = fed.init(task.params, task.inner_tx, task.outer_tx, 1)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
        saved, _, meta = ckpt.restore(server0)
        ckpt.close()
        assert meta == {"round": 3} and int(saved.round) == 3
        for a, b in zip(
            jax.tree.leaves(strategy.server.params), jax.tree.leaves(saved.params), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        moved = jax.tree.leaves(strategy.server.params)[0] - jax.tree.leaves(task.params)[0]
        assert float(np.max(np.abs(moved))) > 0
    finally:
        strategy.ckpt.close()
