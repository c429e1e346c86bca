"""Orbax checkpoints of the whole training state, written atomically.

One checkpoint per saved step holds three items: ``state`` (params, optimizer state, step, RNG:
a pytree), ``data`` (the grain iterator state, JSON) and ``meta`` (JSON: the config and
anything else the run needs to continue). Orbax writes each step into a temporary directory
and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.
Both policies are explicit: save every ``every`` steps (and when forced), keep the newest
``keep``. `Checkpointer.restore_intact` resumes from the newest checkpoint that reads back,
moving damaged newer ones aside (to ``<directory>.damaged/``) with one warning line each.

``directory`` may be local or a URI of remote storage (``gs://bucket/run/checkpoints``): orbax
gets it as an ``etils.epath.Path``, and only a local path is made absolute.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as policies

from jaxeff.train.metrics import is_remote


class CheckpointError(ValueError):
    """A checkpoint directory is missing, empty, corrupt or does not fit the model."""


class Checkpointer:
    """Saves and restores ``(state, data, meta)`` under ``directory``.

    Args:
      directory: where step folders go (created if missing): a str or ``epath.Path``, local
        or remote (``gs://...``).
      every: save-decision policy, a save every ``every`` steps.
      keep: preservation policy, keep the newest ``keep`` checkpoints.
      async_save: write in a background thread (``wait()`` before reading it back).

    Attributes:
      directory: ``directory`` as a str: absolute when local, the URI unchanged when remote.
    """

    def __init__(self, directory, every: int = 100, keep: int = 3, async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every={every} and keep={keep} must both be >= 1")
        directory = os.fspath(directory)
        self.directory = directory if is_remote(directory) else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.FixedIntervalPolicy(every),
            preservation_policy=policies.LatestN(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            epath.Path(self.directory), item_names=("state", "data", "meta"), options=options
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

    def restore_intact(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """``(step, state, data, meta)`` of the newest checkpoint that restores, or None when
        there is none. Each damaged newer one (unreadable or truncated) gets one warning line
        on stderr naming it and is moved to ``<directory>.damaged/<step>``: kept for
        inspection, out of the way of the step that will be saved again. When no checkpoint
        restores (every one damaged, or a config that does not fit them) nothing is moved
        and CheckpointError names the newest one's problem."""
        steps = sorted(self.all_steps(), reverse=True)
        errors: list[tuple[int, CheckpointError]] = []
        # before the first attempt: a failing restore can leave its late callbacks behind
        # while the error is still propagating (see `_quiet_closed_loop_callbacks`)
        _quiet_closed_loop_callbacks()
        for step in steps:
            try:
                restored = self.restore(abstract_state, step)
            except CheckpointError as err:
                _quiet_closed_loop_callbacks()
                errors.append((step, err))
                continue
            for bad, err in errors:
                aside = self._set_aside(bad)
                _warn(f"{err}; skipped it (moved to {aside}) and resumed from step {step}")
            return (step, *restored)
        if errors:
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores (steps {[s for s, _ in errors]}); "
                f"the newest: {errors[0][1]}"
            )
        return None

    def _set_aside(self, step: int) -> str:
        """Moves step folder ``step`` to ``<directory>.damaged/<step>`` (process 0 only)."""
        target = os.path.join(self.directory + ".damaged", str(step))
        if jax.process_index() == 0:
            _move_tree(epath.Path(self.directory) / str(step), epath.Path(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxeff_checkpoint_set_aside_{step}")
        self._manager.reload()
        return target

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
        """Waits for a save in flight and shuts orbax's background machinery down (also after
        an error, so that nothing prints once the error line is out)."""
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _move_tree(source: epath.Path, target: epath.Path) -> None:
    """Moves folder ``source`` to ``target`` (replacing it): a rename on local disk; on an
    object store, where folders exist only through the objects in them and a rename is a copy
    anyway, a copy of each file and then the removal of ``source``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.rmtree()
    if not is_remote(source):
        shutil.move(os.fspath(source), os.fspath(target))
        return
    _copy_tree(source, target)
    source.rmtree()


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        if child.is_dir():
            _copy_tree(child, target / child.name)
        else:
            child.copy(target / child.name, overwrite=True)


def _quiet_closed_loop_callbacks() -> None:
    """After a failed restore, tensorstore threads may still complete futures of orbax's
    finished asyncio loop; ``call_soon_threadsafe`` then raises "Event loop is closed", which
    Python prints as a traceback at some later point. Those (and only those) are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxeff_quiet", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._jaxeff_quiet = True
    sys.unraisablehook = hook


def _warn(message: str) -> None:
    sys.stderr.write("jaxeff: warning: " + " ".join(message.split()) + "\n")
    sys.stderr.flush()
