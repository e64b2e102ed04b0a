"""Orbax checkpoints of train state + data iterator + config, with safe resume.

Each step directory is a Composite of
  state:  the train state pytree (StandardSave; restored with target shardings,
          so a checkpoint saved on one mesh restores onto another),
  data:   the Grain iterator state (so the resumed run sees the same batches),
  config: the run's config as JSON (for humans and tools).
Restoring tries the latest step first and falls back to older ones, with a
warning, when a step is corrupt or half-written.
"""

import os
import signal
import threading

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:

  def __init__(self, directory, *, save_every, keep, async_save=True):
    self.directory = os.path.abspath(directory)
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def restore(self, abstract_state, data_iterator=None):
    """Restores the newest readable step. Returns (state, step) or (None, None).

    abstract_state: ShapeDtypeStructs carrying the target shardings.
    data_iterator: a Grain iterator whose state is overwritten in place.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as error:  # pylint: disable=broad-except
        logging.warning("Checkpoint step %d in %s cannot be restored (%s: %s); "
                        "falling back to the previous one.", step,
                        self.directory, type(error).__name__, error)
        continue
      logging.info("Restored step %d from %s", step, self.directory)
      return restored["state"], step
    if steps:
      raise RuntimeError(f"no readable checkpoint in {self.directory} "
                         f"(steps {steps} all failed to restore)")
    return None, None

  def should_save(self, step):
    return self.save_every > 0 and step % self.save_every == 0

  def save(self, step, state, data_iterator=None, config=None):
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items["config"] = ocp.args.JsonSave(config)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class PreemptionWatcher:
  """Turns SIGTERM into a flag the train loop polls, agreed across processes."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint and stopping.", signum)
    self._event.set()

  def requested(self):
    """True when any process received SIGTERM."""
    flag = self._event.is_set()
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      flag = bool(multihost_utils.process_allgather(flag).any())
    return flag

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def restore_params(directory, abstract_params, *, item="ema", step=None):
  """Reads only state[item] (e.g. the EMA parameters) from a train checkpoint.

  directory: a checkpoints directory (WORKDIR/checkpoints) or one step of it.
  abstract_params: ShapeDtypeStructs (with shardings) of the parameter tree.
  Returns (params, step). Used by the sampler and evaluator, which need no
  optimizer state.
  """
  directory = os.path.abspath(directory)
  if os.path.basename(directory).isdigit() and step is None:
    directory, step = os.path.dirname(directory), int(os.path.basename(directory))
  manager = ocp.CheckpointManager(directory)
  try:
    steps = sorted(manager.all_steps())
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise FileNotFoundError(f"no step {step} in {directory}; have {steps}")
    target = {item: abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=target, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
  finally:
    manager.close()
  return restored["state"][item], step
