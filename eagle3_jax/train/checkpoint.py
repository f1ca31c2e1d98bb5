"""Orbax checkpoints of the train state plus the data iterator: asynchronous, keep-N, atomic, resumable."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import orbax.checkpoint as ocp

STATE, DATA = "state", "data_iter"


class _IteratorSnapshot:
  """The iterator's state taken when save() is called, so an asynchronous save can never record a later position
  (grain's handler writes it per process: process_<i>-of-<n>.json)."""

  def __init__(self, iterator: Any):
    state = iterator.get_state()
    self._state = state if isinstance(state, bytes) else json.dumps(state, indent=1).encode()

  def get_state(self) -> bytes:
    return self._state


class Checkpointer:
  """Saves {train state, data iterator} under `directory/<step>`; orbax finalises each step atomically (a
  temporary directory renamed on commit), so a killed run leaves whole checkpoints or none."""

  def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, iterator: Any | None) -> bool:
    """Starts saving (returns once the arrays are copied off the device, so `state` may then be donated)."""
    args = {STATE: ocp.args.StandardSave(state)}
    if iterator is not None:
      args[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator))
    return self.manager.save(step, args=ocp.args.Composite(**args), force=True)

  def restore(self, step: int, abstract_state: Any, iterator: Any | None) -> Any:
    """The state at `step`, placed in the shardings that `abstract_state`'s ShapeDtypeStructs carry; the
    iterator (if given) is moved to the position it had when that step was saved."""
    args = {STATE: ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      args[DATA] = grain.checkpoint.CheckpointRestore(iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**args))[STATE]

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
