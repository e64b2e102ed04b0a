"""The training loop, shared by the generator and the tokenizer trainers.

A *task* supplies the model and its loss; everything else (mesh, born-sharded
state, jitted step, data, checkpoints with exact resume, preemption, metrics,
progress) lives here once.

    task.build_model(rngs) -> nnx.Module
    task.loss(model, batch, rng) -> (scalar loss, dict of scalar metrics)
    task.tokens_per_example -> int (for tokens/s)
"""

import time

import jax
import numpy as np
from absl import logging

from heptapod_jax.parallel import sharding
from heptapod_jax.train import checkpoint as checkpoint_lib
from heptapod_jax.train import metrics as metrics_lib
from heptapod_jax.train import step as step_lib


class NonFiniteError(RuntimeError):
  """The loss or the gradient norm became NaN/inf; the message names the step."""


def _abstract_batch(batch, mesh):
  return {key: jax.ShapeDtypeStruct(
      (value.shape[0] * jax.process_count(),) + value.shape[1:], value.dtype,
      sharding=sharding.batch_sharding(mesh, value.ndim))
          for key, value in batch.items()}


def train(task, config, workdir, data_iterator, *, mesh=None):
  """Trains to config.train.num_steps, resuming from WORKDIR/checkpoints.

  data_iterator: Grain iterator of this process's local batches (dicts of
  numpy arrays); its position is checkpointed with the model. SIGTERM saves a
  checkpoint after the current step and returns with reason "preempted".
  Returns a dict with the final step, the last metrics, why it stopped and
  the final state.
  """
  mesh = mesh or sharding.make_mesh(config)
  train_config = config.train
  total_steps = train_config.num_steps
  # Built outside the mesh context: nnx.eval_shape would otherwise read the
  # logical axis names as mesh axes.
  functions = step_lib.build(task, config, mesh, total_steps)
  peak, peak_source = metrics_lib.device_peak_flops()
  with jax.set_mesh(mesh):
    checkpointer = checkpoint_lib.Checkpointer(
        f"{workdir}/checkpoints", save_every=train_config.checkpoint_every,
        keep=train_config.keep_checkpoints,
        async_save=train_config.async_checkpoints)
    state, start_step = checkpointer.restore(functions.abstract_state, data_iterator)
    if state is None:
      state, start_step = functions.init(), 0
      logging.info("Initialised a new train state in %s", workdir)
    else:
      logging.info("Resuming from step %d", start_step)

    watcher = checkpoint_lib.PreemptionWatcher()
    timer = metrics_lib.PhaseTimer()
    with timer.phase("data"):
      first_batch = next(data_iterator)
    compiled = functions.step.lower(state, _abstract_batch(first_batch, mesh)).compile()
    flops = metrics_lib.compiled_flops(compiled)
    logging.info("Step FLOPs per device: %s; peak FLOP/s per device: %.3g (%s)",
                 flops, peak, peak_source)
    global_batch = first_batch[next(iter(first_batch))].shape[0] * jax.process_count()
    reporter = metrics_lib.TrainReporter(
        workdir, total_steps=total_steps, log_every=train_config.log_every,
        examples_per_step=global_batch,
        tokens_per_step=global_batch * task.tokens_per_example,
        flops_per_step=flops, peak_flops=peak)
    config_json = config.to_dict()

    pending = []  # (step, device metrics) since the last check
    last_scalars, reason = {}, "finished"
    step = start_step
    batch = first_batch
    try:
      while step < total_steps:
        if batch is None:
          with timer.phase("data"):
            batch = next(data_iterator)
        with timer.phase("step"):
          state, step_metrics = compiled(state, sharding.put_local_batch(batch, mesh))
        batch = None
        step += 1
        pending.append((step, step_metrics))
        reporter.step_done(step)
        preempted = watcher.requested()
        save = checkpointer.should_save(step) or step == total_steps or preempted
        if step % train_config.log_every == 0 or save:
          with timer.phase("step"):
            host = jax.device_get(pending)
          pending = []
          for pending_step, values in host:
            if not values["finite"]:
              raise NonFiniteError(
                  f"non-finite loss or gradient at step {pending_step} "
                  f"(loss={float(values['loss'])}, grad_norm={float(values['grad_norm'])}); "
                  "stopping. The last checkpoint is left as it was.")
          averaged = {f"train/{key}": float(np.mean([values[key] for _, values in host]))
                      for key in host[-1][1] if key != "finite"}
          last_scalars = reporter.report(step, averaged, timer.pop())
        if hasattr(task, "periodic"):
          with timer.phase("periodic"):
            task.periodic(step=step, params=state["ema"], graphdef=functions.graphdef,
                          rest=functions.rest, mesh=mesh, writer=reporter.writer)
        if save:
          with timer.phase("checkpoint"):
            checkpointer.save(step, state, data_iterator, config_json)
        if preempted:
          reason = "preempted"
          break
    finally:
      checkpointer.close()
      watcher.restore()
      reporter.close()
  logging.info("Training %s at step %d", reason, step)
  return {"step": step, "metrics": last_scalars, "reason": reason, "state": state}
