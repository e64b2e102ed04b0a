"""Multi-host start-up: jax.distributed.initialize when a launcher asks for it.

- Explicit (any platform, and local multi-process CPU runs):
  HEPTAPOD_COORDINATOR_ADDRESS=host:port HEPTAPOD_NUM_PROCESSES=N HEPTAPOD_PROCESS_ID=i
  On CPU this also selects gloo collectives.
- Auto-detected clusters: Cloud TPU pods (several TPU workers), SLURM jobs with
  more than one task, or JAX_COORDINATOR_ADDRESS set: jax.distributed.initialize()
  with its own environment detection.
- Anything else is a single host: nothing is initialised.
"""

import os

import jax
from absl import logging


def _is_multi_host_tpu(env):
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def _is_multi_task_slurm(env):
  return "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1


def maybe_initialize(env=None, timeout_seconds=600):
  """Initialises the distributed runtime if the environment asks for it.

  Returns "explicit", "auto" or None (single host). Call before any other jax use.
  """
  env = os.environ if env is None else env
  if env.get("HEPTAPOD_COORDINATOR_ADDRESS"):
    if env.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=env["HEPTAPOD_COORDINATOR_ADDRESS"],
        num_processes=int(env["HEPTAPOD_NUM_PROCESSES"]),
        process_id=int(env["HEPTAPOD_PROCESS_ID"]),
        initialization_timeout=timeout_seconds)
    mode = "explicit"
  elif (_is_multi_host_tpu(env) or _is_multi_task_slurm(env)
        or env.get("JAX_COORDINATOR_ADDRESS")):
    jax.distributed.initialize(initialization_timeout=timeout_seconds)
    mode = "auto"
  else:
    return None
  logging.info("jax.distributed initialised (%s): process %d of %d, %d local / %d "
               "global devices", mode, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return mode
