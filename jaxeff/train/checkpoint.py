"""Orbax checkpoints of the whole training state, written atomically.

One checkpoint per saved step holds three items: ``state`` (params, optimizer state, step, RNG:
a pytree), ``data`` (the grain iterator state, JSON) and ``meta`` (JSON: the config and
anything else the run needs to continue). Orbax writes each step into a temporary directory
and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.
Both policies are explicit: save every ``every`` steps (and when forced), keep the newest
``keep``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


class CheckpointError(ValueError):
    """A checkpoint directory is missing, empty, corrupt or does not fit the model."""


class Checkpointer:
    """Saves and restores ``(state, data, meta)`` under ``directory``.

    Args:
      directory: where step folders go (created if missing).
      every: save-decision policy, a save every ``every`` steps.
      keep: preservation policy, keep the newest ``keep`` checkpoints.
      async_save: write in a background thread (``wait()`` before reading it back).
    """

    def __init__(self, directory: str, every: int = 100, keep: int = 3, async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every={every} and keep={keep} must both be >= 1")
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(every),
            preservation_policy=policies.LatestN(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "meta"), options=options
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data: dict, meta: dict, force: bool = False) -> bool:
        """Saves if the policy says so (or ``force``); returns whether a save started."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
        """Restores ``(state, data, meta)`` of ``step`` (default: newest) into the structure,
        shapes, dtypes and shardings of ``abstract_state``."""
        step = self._check_step(step)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # noqa: BLE001 - orbax/tensorstore raise many kinds
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is corrupt or does not fit the "
                f"model ({type(err).__name__}: {first_line[:200]})"
            ) from err
        return restored.state, restored.data, restored.meta

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the ``meta`` item (the config), to build the abstract state before `restore`."""
        step = self._check_step(step)
        try:
            return self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} has no readable meta item ({err})"
            ) from err

    def _check_step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found in {self.directory}")
        if step not in self.all_steps():
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; have {self.all_steps()}"
            )
        return step

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()
